"""Krea 2 (single-stream joint attention, gated output, text-fusion refiner, masks with pads in the middle): nagkit
vs a plain two-stream reference, identities, rows, windows, removal, the tiny pipeline, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import Krea2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

import nagkit
from nagkit.adapters.krea2 import NAGKrea2AttnProcessor
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES

from .reference import reference_nag

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
NAME = "tiny-krea2"
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


# ------------------------------------------------------------------------------------------------ reference
def _attention(attn, x, rope, mask):
    """Krea 2 attention written out: the pre-gate output ``(B, L, H·D)`` (explicit softmax) and the gate logits."""
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.num_heads, attn.head_dim)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
    v = attn.to_v(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / attn.head_dim ** 0.5
    if mask is not None:  # (B, Lk) keep-mask
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(x.dtype)
    return out.flatten(2, 3), attn.to_gate(x)


def _fusion_block(block, x, mask):
    x = x + _gated(block.attn, block.norm1(x), None, mask)
    return x + block.ff(block.norm2(x))


def _gated(attn, x, rope, mask):
    out, gate = _attention(attn, x, rope, mask)
    return attn.to_out[0](out * torch.sigmoid(gate))


def _text_stream(model, text, mask):
    """One text alone through the text fusion (layer-wise blocks per token, projector, refiner) and ``txt_in``."""
    b, length, layers, dim = text.shape
    x = text.reshape(b * length, layers, dim)
    for block in model.text_fusion.layerwise_blocks:
        x = _fusion_block(block, x, None)
    x = model.text_fusion.projector(x.reshape(b, length, layers, dim).permute(0, 1, 3, 2)).squeeze(-1)
    for block in model.text_fusion.refiner_blocks:
        x = _fusion_block(block, x, mask)
    return model.txt_in(x)


@torch.no_grad()
def krea2_reference(model, inputs, negative, scale=SCALE, tau=TAU, alpha=ALPHA):
    """NAG on Krea 2 written out plainly with two streams per sample, the prompt's ``[Tp | I]`` and the negative's
    ``[Tn | I]``: each text runs the text fusion alone; in every block both streams run a full joint attention over
    their own sequence (negative: zero text positions, its own mask); the image part of both pre-gate attention
    outputs is replaced by ``NAG(Z+, Z-)``, then each stream is gated, projected and updated; the image stream
    continues from the prompt's."""
    hidden, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
    batch, li = hidden.shape[:2]
    neg = negative["encoder_hidden_states"].expand(batch, -1, -1, -1)
    lp, ln = text.shape[1], neg.shape[1]
    masks = [inputs.get("encoder_attention_mask"), negative.get("encoder_attention_mask")]
    masks = [None if m is None else m.expand(batch, -1).bool() for m in masks]
    temb = model.time_embed(inputs["timestep"], dtype=hidden.dtype)
    temb_mod = model.time_mod_proj(F.gelu(temb, approximate="tanh"))
    texts = [_text_stream(model, t, m) for t, m in zip((text, neg), masks, strict=True)]
    ids = inputs["position_ids"]
    ropes = [model.rotary_emb(ids), model.rotary_emb(torch.cat([ids.new_zeros(ln, 3), ids[lp:]]))]
    keys = [None if m is None else torch.cat([m, m.new_ones(batch, li)], dim=1) for m in masks]
    x = model.img_in(hidden)
    for block in model.transformer_blocks:
        prescale, preshift, pregate, postscale, postshift, postgate = (
            temb_mod.unflatten(-1, (6, -1)) + block.scale_shift_table).unbind(-2)
        seqs = [torch.cat([t, x], dim=1) for t in texts]
        outs = [_attention(block.attn, (1 + prescale) * block.norm1(s) + preshift, r, k)
                for s, r, k in zip(seqs, ropes, keys, strict=True)]
        guided = reference_nag(outs[0][0][:, lp:], outs[1][0][:, ln:], scale, tau, alpha)
        new = []
        for s, (z, gate), n in zip(seqs, outs, (lp, ln), strict=True):
            z = torch.cat([z[:, :n], guided], dim=1) * torch.sigmoid(gate)
            s = s + pregate * block.attn.to_out[0](z)
            new.append(s + postgate * block.ff((1 + postscale) * block.norm2(s) + postshift))
        texts, x = [new[0][:, :lp], new[1][:, :ln]], new[0][:, lp:]
    return model.final_layer(x, temb)


# ------------------------------------------------------------------------------------------------ fixtures
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Krea2Transformer2DModel(
        in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=2, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # the zero-initialised norm scales and modulation tables: random, so nothing is trivial
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight") or "scale_shift_table" in name:
                p.normal_(0.0, 0.3)
    return model


def _ids(lp, grid=4):
    image = torch.zeros(grid, grid, 3)
    image[..., 1] = torch.arange(grid)[:, None]
    image[..., 2] = torch.arange(grid)[None, :]
    return torch.cat([torch.zeros(lp, 3), image.reshape(-1, 3)])


@pytest.fixture(scope="module")
def krea2():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    b, lp, ln = 2, 7, 6
    mask = torch.ones(b, lp, dtype=torch.bool)
    mask[0, 3:5] = False  # [prompt | PAD | suffix]: pads in the middle, as Krea2Pipeline builds them
    inputs = dict(hidden_states=torch.randn(b, 16, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, lp, 3, 16, generator=g), timestep=torch.tensor([0.7, 0.7]),
                  position_ids=_ids(lp), encoder_attention_mask=mask, return_dict=False)
    neg_mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1]], dtype=torch.bool)  # slot 3: padded in both
    negative = {"encoder_hidden_states": torch.randn(b, ln, 3, 16, generator=g), "encoder_attention_mask": neg_mask}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def _row(inputs, i):
    return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and k != "position_ids" else v) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------------ denoiser level
def test_reference_reproduces_the_model_at_identity(krea2):
    model, inputs, _ = krea2
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    torch.testing.assert_close(krea2_reference(model, inputs, same), run(model, inputs), atol=1e-5, rtol=1e-5)


def test_matches_reference_with_middle_pads_and_padding_dropped(krea2):
    model, inputs, negative = krea2
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        packing = guide.state.last_packing
        assert guide.state.calls == {"guided": 1, "unguided": 0}
    assert (packing.lp, packing.ln) == (7, 5)  # the slot padded in every row is dropped (exact), order kept
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, krea2_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_refiner_sees_each_text_alone(krea2):
    """The negative stream entering block 0 is the model's own text fusion + txt_in of the negative alone (the
    refiner self-attends per segment); the prompt's part is the prompt alone's."""
    model, inputs, negative = krea2
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach().clone()

    handle = model.transformer_blocks[0].register_forward_pre_hook(grab)
    try:
        run(model, inputs)
        plain = seen["x"]
        with nagkit.apply(model, negative=negative, scale=SCALE):
            run(model, inputs)
    finally:
        handle.remove()
    keep = negative["encoder_attention_mask"].any(0)
    neg, neg_mask = negative["encoder_hidden_states"][:, keep], negative["encoder_attention_mask"][:, keep]
    with torch.no_grad():
        alone = model.txt_in(model.text_fusion(neg, attention_mask=neg_mask[:, None, None]))
    lp, ln = 7, int(keep.sum())
    valid = neg_mask[:, :, None].expand_as(alone)  # padded slots are never read: compare the valid ones
    torch.testing.assert_close(seen["x"][:, lp:lp + ln][valid], alone[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["x"][:, :lp], plain[:, :lp], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["x"][:, lp + ln:], plain[:, lp:], atol=0, rtol=0)


def test_longer_negative_without_masks(krea2):
    model, inputs, _ = krea2
    g = torch.Generator().manual_seed(2)
    plain_inputs = {**inputs, "encoder_attention_mask": None}
    negative = {"encoder_hidden_states": torch.randn(2, 11, 3, 16, generator=g)}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, plain_inputs)
        assert guide.state.last_packing.ln == 11
    torch.testing.assert_close(out, krea2_reference(model, plain_inputs, negative), atol=1e-5, rtol=1e-5)
    # a masked negative with an unmasked prompt: the prompt counts as all valid
    neg_mask = torch.ones(2, 11, dtype=torch.bool)
    neg_mask[1, 2:6] = False
    negative["encoder_attention_mask"] = neg_mask
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, plain_inputs)
    torch.testing.assert_close(out, krea2_reference(model, plain_inputs, negative), atol=1e-5, rtol=1e-5)


def test_per_sample_negatives_equal_single_runs(krea2):
    model, inputs, negative = krea2
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        both = run(model, inputs)
    for i in range(2):
        with nagkit.apply(model, negative={k: v[i:i + 1] for k, v in negative.items()}, scale=SCALE, tau=TAU,
                          alpha=ALPHA):
            torch.testing.assert_close(run(model, _row(inputs, i)), both[i:i + 1], atol=1e-5, rtol=1e-5)


def test_broadcast_negative_and_batched_cfg_rows(krea2):
    model, inputs, negative = krea2
    one = {k: v[:1] for k, v in negative.items()}
    with nagkit.apply(model, negative=one, scale=SCALE, tau=TAU, alpha=ALPHA):
        a = run(model, inputs)
    with nagkit.apply(model, negative={k: torch.cat([v, v]) for k, v in one.items()}, scale=SCALE, tau=TAU,
                      alpha=ALPHA):
        b = run(model, inputs)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # a bare denoiser called on [uncond, cond] rows (diffusers' batched-CFG order): only the conditional half is
    # guided, the unconditional half stays the plain model's
    g = torch.Generator().manual_seed(3)
    uncond = torch.randn(inputs["encoder_hidden_states"].shape, generator=g)
    cfg = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and k != "position_ids" else v)
           for k, v in inputs.items()}
    cfg["encoder_hidden_states"] = torch.cat([uncond, inputs["encoder_hidden_states"]])
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
        single = run(model, inputs)
    torch.testing.assert_close(out[:2], run(model, cfg)[:2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[2:], single, atol=1e-5, rtol=1e-5)


def test_identities_window_and_removal(krea2):
    model, inputs, negative = krea2
    base = run(model, inputs)
    before = dict(model.attn_processors)
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    with nagkit.apply(model, negative=negative, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)  # scale 1: NAG is off, the plain model runs
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        guide.update(negative=same, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1
    # window: the call sits at u = 1 - t (the pipeline passes t / 1000)
    with nagkit.apply(model, negative=negative, scale=SCALE, start=0.31, end=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
        guide.update(start=0.0, end=0.31)
        assert not torch.equal(run(model, inputs), base)
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, m.processor) and None)
               for n, m in model.named_modules() if n.endswith(".attn")]
    run(model, inputs)
    for h in handles:
        h.remove()
    guided = {n for n, p in seen.items() if isinstance(p, NAGKrea2AttnProcessor)}
    assert guided == {f"transformer_blocks.{i}.attn" for i in range(2)} | {
        f"text_fusion.refiner_blocks.{i}.attn" for i in range(2)}  # never the layer-wise text-fusion blocks
    guide.remove()
    assert all(before[k] is v for k, v in model.attn_processors.items())
    assert "forward" not in model.__dict__ and not hasattr(model, "_nagkit_guide")
    assert torch.equal(run(model, inputs), base)


def test_unsupported_processors_and_inputs_are_refused(krea2):
    model, inputs, negative = krea2

    class Custom:
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            return attn.to_out[0](hidden_states)

    attn = model.transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(Custom())
    try:
        with pytest.raises(NotImplementedError, match="transformer_blocks.1.attn uses Custom.*Krea2AttnProcessor"):
            nagkit.apply(model, negative=negative)
    finally:
        attn.set_processor(original)
    with pytest.raises(ValueError, match=r"must be a 4-D \(batch, tokens, \.\.\., channels\) tensor"):
        nagkit.apply(model, negative={"encoder_hidden_states": torch.zeros(1, 4, 16)})
    with pytest.raises(ValueError, match="mode='official' is not available for Krea2Transformer2DModel"):
        nagkit.apply(model, negative=negative, mode="official")
    with nagkit.apply(model, negative={"encoder_hidden_states": torch.zeros(1, 4, 2, 16)}):
        with pytest.raises(ValueError, match="do not match the prompt's"):
            run(model, inputs)
    original._parallel_config = object()  # context parallelism would split the packed text
    try:
        with nagkit.apply(model, negative=negative), pytest.raises(NotImplementedError, match="context parallel"):
            run(model, inputs)
    finally:
        original._parallel_config = None


# ------------------------------------------------------------------------------------------------ pipeline level
@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES[NAME](seed=0)


def generate(pipe, prompt=PROMPT, seeds=(0,), guidance=0.0, steps=2, **kwargs):
    call = dict(TINY_CALL_KWARGS[NAME], num_inference_steps=steps, output_type="latent", guidance_scale=guidance)
    call.update(kwargs)
    return pipe(prompt=prompt, generator=[torch.Generator().manual_seed(s) for s in seeds], **call)[0]


def test_tiny_pipeline_template_and_full_call(pipe):
    """The tiny tokenizer keeps Krea 2's template lengths; a full call (VAE decode) guided, then removal."""
    tok = pipe.tokenizer
    assert len(tok(pipe.prompt_template_encode_prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert len(tok(pipe.prompt_template_encode_suffix).input_ids) == pipe.prompt_template_encode_num_suffix_tokens
    embeds, mask = pipe.encode_prompt("a red cat", max_sequence_length=32)
    assert embeds.shape == (1, 32, 3, 16) and mask.dtype == torch.bool
    assert mask[0, :3].all() and not mask[0, 3:27].any() and mask[0, 27:].all()  # [prompt | PAD | suffix]
    call = dict(TINY_CALL_KWARGS[NAME], num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE)
    assert guide.config == nagkit.PRESETS["krea2"]
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert guide.state.calls == {"guided": 2, "unguided": 2}
    assert (image - base).abs().max() > 1e-4
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    assert all(before[n] is m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor"))
    assert torch.equal(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images, base)


def test_pipeline_denoiser_matches_reference_and_cfg_call_is_untouched(pipe):
    """Inside the pipeline (CFG on): the guided conditional call equals the reference on the real encoded prompt and
    negative (pads in the middle, dropped by nagkit); the separate unconditional call is bit-identical."""
    outputs, inputs = [], []

    def record(module, args, kwargs, output):
        inputs.append({k: v for k, v in kwargs.items()})
        outputs.append(output[0].detach().clone())

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        generate(pipe, guidance=3.0, steps=1, negative_prompt="ugly")
        base = list(outputs)
        outputs.clear()
        inputs.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
            generate(pipe, guidance=3.0, steps=1, negative_prompt="ugly")
            assert guide.state.calls == {"guided": 1, "unguided": 1}
            packing = guide.state.last_packing
    finally:
        handle.remove()
    assert torch.equal(outputs[1], base[1])  # the unconditional call: plain model
    assert packing.lp == 32 and packing.ln < 32  # the negative's middle padding dropped
    neg, neg_mask = pipe.encode_prompt(NEGATIVE, max_sequence_length=32)
    cond = {k: v for k, v in inputs[0].items() if k not in ("attention_kwargs",)}
    assert cond["encoder_hidden_states"].shape[1] == 32  # the hook sees the call's own (unpacked) arguments
    ref = krea2_reference(pipe.transformer, cond, {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask})
    torch.testing.assert_close(outputs[0], ref, atol=1e-5, rtol=1e-5)


def test_pipeline_identities_batches_and_window(pipe):
    base = generate(pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0) as guide:
        assert torch.equal(generate(pipe), base)
        guide.update(negative_prompt=PROMPT, scale=5.0, alpha=0.5)
        torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 2
    # per-sample negatives in a 2-prompt batch = single runs
    prompts, negatives = [PROMPT, "a blue dog running in the snow"], [NEGATIVE, "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        batch = generate(pipe, prompt=prompts, seeds=(0, 1), guidance=2.0)
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(pipe, prompt=prompts[i], seeds=(i,), guidance=2.0)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)
    # window (positions u = 1 - t/1000): only the first step
    first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]
    between = (first + second) / 2
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=between, end=between) as guide:
        assert torch.equal(generate(pipe), base) and guide.state.calls["guided"] == 0
        guide.update(start=0.0, end=between)
        guide.state.calls.update(guided=0, unguided=0)
        first_only = generate(pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 1}
    assert not torch.equal(first_only, base)


def test_pipeline_negative_in_embedding_form_and_images_per_prompt(pipe):
    neg, neg_mask = pipe.encode_prompt("dark night", max_sequence_length=32)
    with nagkit.apply(pipe, negative_prompt="dark night", scale=5.0):
        from_text = generate(pipe, prompt=["a red cat", "a blue dog"], seeds=(0, 1, 2, 3), num_images_per_prompt=2)
    with nagkit.apply(pipe, negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, scale=5.0) as guide:
        from_embeds = generate(pipe, prompt=["a red cat", "a blue dog"], seeds=(0, 1, 2, 3), num_images_per_prompt=2)
        assert guide.state.last_packing.batch == 4
    torch.testing.assert_close(from_text, from_embeds, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="4-D"):
        nagkit.apply(pipe, negative_prompt_embeds=neg[:, :, 0])


# ------------------------------------------------------------------------------------------------ nagkit bench
def _tiny_spec():
    from nagkit.bench import FamilySpec, Geometry

    config = dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=3,
                  text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
                  num_layerwise_text_blocks=1, num_refiner_text_blocks=2, axes_dims_rope=[4, 6, 6])
    patterns = tuple(f"transformer_blocks.*.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_gate", "to_out.0"))
    return FamilySpec(name="tiny-krea2", title="tiny Krea 2", source="test", model_class="Krea2Transformer2DModel",
                      attention="joint", inputs="krea2", config=config,
                      geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=4, text_tokens=8,
                                        text_dim=16, mask=True),
                      text_linears=(*patterns, "transformer_blocks.*.ff.*"),
                      joint_attention=("transformer_blocks.*.attn",))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # bf16 meta RMSNorm
def test_bench_counts_nag_at_the_analytic_minimum():
    """nagkit's FLOPs are exactly the analytic minimum (text fusion of the negative included), with the 8-slot
    negative and with a 2-token one (padding dropped); the "official" count (two full joint attentions) adds exactly
    the image→image attention of every block."""
    from nagkit.bench import build_inputs, run_family
    from nagkit.bench import flops as bench_flops

    spec = _tiny_spec()
    result = run_family(spec, short_negative=2)
    v = result.variants
    assert result.nag_supported and not result.notes and result.nag_minus_min == 0
    assert v["nag-official"].flops is None and v["nag-official"].note.startswith("n/a")
    model = bench_flops.build_model(spec)
    image_attention = bench_flops.shared_image_attention_flops(model, spec, single_blocks=True)
    assert v["official"].flops - v["nag"].flops == image_attention > 0
    short = result.short_negative
    assert short is not None and 0 < short.nag < short.nag_padded and short.nag == pytest.approx(short.min, abs=1e-12)
    inputs = build_inputs(spec)
    assert inputs.kwargs["encoder_hidden_states"].shape == (1, 8, 3, 16)
    assert inputs.kwargs["position_ids"].shape == (8 + 16, 3)
    assert inputs.negative["encoder_attention_mask"].dtype == torch.bool


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_shipped_config_and_the_flux_way_reference(krea2):
    """The shipped config builds the class-default (Krea 2) model; the FLUX-way reference (negative as a second row
    with an image copy, the whole model doubled) computes nagkit's NAG."""
    from nagkit.adapters.krea2 import krea2_official_way
    from nagkit.bench import build_inputs, load_families
    from nagkit.bench import flops as bench_flops
    from nagkit.bench.reference import OfficialLayout

    spec = load_families()["krea2"]
    model = bench_flops.build_model(spec)
    assert len(model.transformer_blocks) == 28 and bench_flops.parameter_count(model) == 12_820_073_036
    assert build_inputs(spec).kwargs["hidden_states"].shape == (1, 4096, 64)
    model, inputs, negative = krea2
    layout = OfficialLayout(lp=7, ln=6, scale=SCALE, tau=TAU, alpha=ALPHA)
    with krea2_official_way(model, negative, layout):
        official = run(model, inputs)
    assert "forward" not in model.__dict__
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        fast = run(model, inputs)
    torch.testing.assert_close(official, fast, atol=1e-5, rtol=1e-5)
    with krea2_official_way(model, negative, OfficialLayout(lp=7, ln=6, scale=1.0)):
        unguided = run(model, inputs)
    torch.testing.assert_close(unguided, run(model, inputs), atol=1e-5, rtol=1e-5)
