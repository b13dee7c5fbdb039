"""LTX-Video (``LTXVideoTransformer3DModel``): nagkit vs an independent doubled-batch reference, identities, window,
removal, the tiny pipelines (T2V, I2V, condition) and the refusal of unsupported processors."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline

import nagkit
from nagkit.adapters.ltx import tiny_ltx_transformer
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
F_, H_, W_ = 2, 4, 4  # latent frames, height, width: 32 video tokens


# ------------------------------------------------------------------------------------------------ reference
def ref_nag(zp, zn, scale=SCALE, tau=TAU, alpha=ALPHA):
    zt = scale * zp - (scale - 1) * zn
    ratio = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = zt * torch.minimum(ratio, torch.full_like(ratio, tau)) / ratio
    return alpha * zh + (1 - alpha) * zp


class DoubledRef:
    """attn2 on a doubled batch ``[prompt rows | negative rows]`` (same video tokens, each half its own text and
    bias): both halves get NAG(Z+, Z-), so the video tokens of the two halves stay equal through the blocks."""

    def __init__(self, **nag):
        self.nag = nag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b = hidden_states.shape[0]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None])  # (B, 1, 1, L) bias
        z = z.transpose(1, 2).flatten(2)
        guided = ref_nag(z[: b // 2], z[b // 2:], **self.nag)
        return attn.to_out[0](torch.cat([guided, guided]))


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes}, return_dict=False)[0]


def _pad(x, length):
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def reference(model, inputs, negative, **nag):
    """Rows of ``inputs`` all guided with ``negative`` (same rows)."""
    text, mask = inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    ntext, nmask = negative["encoder_hidden_states"], negative["encoder_attention_mask"]
    length = max(text.shape[1], ntext.shape[1])  # masked padding: exact (exp(-10000) is 0)
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    big["encoder_hidden_states"] = torch.cat([_pad(text, length), _pad(ntext, length)])
    big["encoder_attention_mask"] = torch.cat([_pad(mask, length), _pad(nmask, length)])
    originals = {n: m.processor for n, m in model.named_modules() if n.endswith("attn2")}
    try:
        for n, m in model.named_modules():
            if n.endswith("attn2"):
                m.set_processor(DoubledRef(**nag))
        return run(model, big)[: text.shape[0]]
    finally:
        for n, m in model.named_modules():
            if n in originals:
                m.set_processor(originals[n])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ltx():
    model = tiny_ltx_transformer(seed=0, text_dim=16)
    g = torch.Generator().manual_seed(1)
    b, lt = 2, 7
    mask = torch.ones(b, lt, dtype=torch.long)
    mask[0, 5:] = 0
    inputs = dict(hidden_states=torch.randn(b, F_ * H_ * W_, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, lt, 16, generator=g), timestep=torch.tensor([700.0, 700.0]),
                  encoder_attention_mask=mask, num_frames=F_, height=H_, width=W_,
                  rope_interpolation_scale=(1 / 25, 32, 32))
    nmask = torch.ones(b, 5, dtype=torch.long)
    nmask[1, 3:] = 0
    negative = {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g), "encoder_attention_mask": nmask}
    return model, inputs, negative


def test_matches_reference_per_sample_negatives_and_masks(ltx):
    model, inputs, negative = ltx
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
        assert guide.state.last_packing.ln == 5  # another length than the prompt's 7
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, negative, scale=SCALE, tau=TAU, alpha=ALPHA),
                               atol=1e-5, rtol=1e-5)


def test_padding_of_the_negative_is_dropped_exactly(ltx):
    model, inputs, negative = ltx
    one = {k: v[:1] for k, v in negative.items()}
    padded = {"encoder_hidden_states": _pad(one["encoder_hidden_states"], 12),
              "encoder_attention_mask": _pad(one["encoder_attention_mask"], 12)}
    padded["encoder_hidden_states"][:, 5:] = 3.0  # garbage under the mask
    with nagkit.apply(model, negative=one, scale=SCALE, tau=TAU, alpha=ALPHA):
        a = run(model, inputs)
    with nagkit.apply(model, negative=padded, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        b = run(model, inputs)
        assert guide.state.last_packing.ln == 5
    assert torch.equal(a, b)


def test_cfg_rows_and_image_conditioning(ltx):
    """Batched CFG ``[uncond, cond]`` with per-token timesteps (first latent frame conditioned: t = 0 there): the
    unconditional rows are bit-identical to the plain model, the conditional ones equal the reference."""
    model, inputs, negative = ltx
    g = torch.Generator().manual_seed(2)
    uncond_text = torch.randn(2, 7, 16, generator=g)
    t = torch.full((2, F_ * H_ * W_), 700.0)
    t[:, : H_ * W_] = 0.0  # conditioned first frame
    cond = {**inputs, "timestep": t}
    big = {**cond, "hidden_states": torch.cat([inputs["hidden_states"]] * 2), "timestep": torch.cat([t, t]),
           "encoder_hidden_states": torch.cat([uncond_text, inputs["encoder_hidden_states"]]),
           "encoder_attention_mask": torch.cat([torch.ones(2, 7, dtype=torch.long), inputs["encoder_attention_mask"]])}
    plain = run(model, big)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        guide.state.fixed.positive = inputs["encoder_hidden_states"]  # as a pipeline records its prompt
        out = run(model, big)
        assert guide.state.last_packing.rows == slice(2, 4)
    assert torch.equal(out[:2], plain[:2])
    torch.testing.assert_close(out[2:], reference(model, cond, negative, scale=SCALE, tau=TAU, alpha=ALPHA),
                               atol=1e-5, rtol=1e-5)


def test_identities_window_and_removal(ltx):
    model, inputs, negative = ltx
    base = run(model, inputs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    guide = nagkit.apply(model, negative=negative, scale=1.0)
    assert torch.equal(run(model, inputs), base)
    guide.update(scale=SCALE, alpha=0.0)
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    guide.update(alpha=ALPHA, start=0.5)  # u = 1 - 700/1000 = 0.3 < 0.5: outside the window
    assert torch.equal(run(model, inputs), base)
    assert guide.state.calls["unguided"] >= 1
    guide.update(start=0.0, end=0.2)  # 0.3 > 0.2: outside
    assert torch.equal(run(model, inputs), base)
    guide.update(end=0.5)
    assert not torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="mode='official' is not available"):
        guide.update(mode="official")
    guide.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(before[k] is after[k] for k in before)
    assert torch.equal(run(model, inputs), base)


def test_unsupported_processor_is_refused(ltx):
    model, inputs, negative = ltx
    original = model.transformer_blocks[0].attn2.processor

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)

    model.transformer_blocks[0].attn2.set_processor(Custom())
    try:
        with pytest.raises(NotImplementedError, match="transformer_blocks.0.attn2 uses Custom.*LTXVideoAttnProcessor"):
            nagkit.apply(model, negative=negative)
    finally:
        model.transformer_blocks[0].attn2.set_processor(original)


# ------------------------------------------------------------------------------------------------ pipelines
PROMPT, NEGATIVE = "a red cat walking on a table", "blurry low quality"


@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES["tiny-ltx"](seed=0)


def generate(pipe, guidance=3.0, klass=None, **kwargs):
    p = pipe if klass is None else klass(**pipe.components)
    call = dict(TINY_CALL_KWARGS["tiny-ltx"], num_inference_steps=2, output_type="latent", guidance_scale=guidance)
    call.update(kwargs)
    return p(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0], p


def test_pipeline_cfg_identity_and_removal(pipe):
    base, _ = generate(pipe)
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, tau=2.5, alpha=0.5)
    out, _ = generate(pipe)
    assert guide.state.calls["guided"] == 2  # one batched [uncond, cond] call per step
    assert guide.state.last_packing.rows == slice(1, 2)
    assert (out - base).abs().max() > 1e-4
    guide.update(scale=1.0)
    assert torch.equal(generate(pipe)[0], base)
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__
    after = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert all(before[k] is after[k] for k in before)
    assert torch.equal(generate(pipe)[0], base)


def test_pipeline_without_cfg_equals_model_level_negative(pipe):
    """No CFG: the pipeline's NAG negative equals the same negative encoded by hand and given to the denoiser."""
    embeds, mask, _, _ = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=16)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, tau=2.5, alpha=0.5):
        a, _ = generate(pipe, guidance=1.0)
    with nagkit.apply(pipe.transformer, negative={"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
                      scale=5.0, tau=2.5, alpha=0.5):
        b, _ = generate(pipe, guidance=1.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("klass", [LTXImageToVideoPipeline, LTXConditionPipeline])
def test_image_conditioned_pipelines(pipe, klass):
    kwargs = {"image": tiny_condition_image()}
    if klass is LTXConditionPipeline:
        kwargs = {"image": tiny_condition_image(), "frame_index": 0, "strength": 1.0}
    base, p = generate(pipe, klass=klass, **kwargs)
    with nagkit.apply(p, negative_prompt=NEGATIVE, scale=5.0, tau=2.5, alpha=0.5) as guide:
        out, _ = generate(p, **kwargs)
        assert guide.state.calls["guided"] == 2
        guide.update(scale=1.0)
        assert torch.equal(generate(p, **kwargs)[0], base)
    assert (out - base).abs().max() > 1e-4
    assert torch.equal(generate(p, **kwargs)[0], base)


def test_pipeline_per_sample_negatives_equal_single_runs(pipe):
    prompts, negatives = [PROMPT, "a dog running in the snow"], [NEGATIVE, "dark noisy oversaturated"]
    call = dict(TINY_CALL_KWARGS["tiny-ltx"], num_inference_steps=2, output_type="latent", guidance_scale=3.0)
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, tau=2.5, alpha=0.5):
        both = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **call)[0]
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, tau=2.5, alpha=0.5):
            one = pipe(prompt=prompts[i], generator=[torch.Generator().manual_seed(i)], **call)[0]
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=1e-5)
