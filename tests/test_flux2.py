"""FLUX.2 (double + single blocks, Klein KV): nagkit vs plain references, identities, rows, windows, removal, the
tiny dev / Klein / Klein-inpaint / Klein-KV pipelines, refusals.

Two references, both written here on top of the model's own blocks and diffusers processors (no nagkit kernel):

* :func:`two_pass_reference` (any negative length): the model's forward written out; every block runs twice, first
  on the negative text stream (recording the image attention output ``Z-`` before the output projection), then on
  the prompt's (replacing ``Z+`` by ``NAG(Z+, Z-)``). One image stream, two text streams.
* :func:`doubled_reference` (negative as long as the prompt): the model's own forward on the doubled batch
  ``[prompt rows; negative rows]``; in every attention the image part of both halves' attention output is replaced by
  ``NAG(Z+, Z-)`` so the two image streams stay one. Runs the Klein KV extract/cached steps unchanged.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)

import nagkit
from nagkit.adapters.flux2 import (
    tiny_flux2_klein_inpaint_pipeline,
    tiny_flux2_klein_kv_pipeline,
)
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .reference import reference_nag, swapped

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(*axes: torch.Tensor) -> torch.Tensor:
    return torch.cartesian_prod(*axes)


def make_model(guidance: bool) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance).eval()


def make_inputs(guidance: bool, batch: int = 2, lt: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    zero = torch.arange(1)
    inputs = dict(hidden_states=torch.randn(batch, 16, 8, generator=g),
                  encoder_hidden_states=torch.randn(batch, lt, 12, generator=g),
                  timestep=torch.full((batch,), 0.7), img_ids=_ids(zero, torch.arange(4), torch.arange(4), zero),
                  txt_ids=_ids(zero, zero, zero, torch.arange(lt)), return_dict=False)
    if guidance:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


@pytest.fixture(scope="module", params=["dev", "klein"])
def flux2(request):
    guidance = request.param == "dev"
    g = torch.Generator().manual_seed(2)
    return make_model(guidance), make_inputs(guidance), {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g)}


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


# ------------------------------------------------------------------------------------------------ references
class Tap(torch.nn.Module):
    """An output projection whose input ``edit`` sees (and may replace) first."""

    def __init__(self, proj, edit):
        super().__init__()
        self.proj, self.edit = proj, edit

    def forward(self, x):
        return self.proj(self.edit(x))


def _two_d(ids):
    return ids[0] if ids.ndim == 3 else ids


def _rope(model, txt_ids, img_ids):
    text, image = model.pos_embed(txt_ids), model.pos_embed(img_ids)
    return torch.cat([text[0], image[0]]), torch.cat([text[1], image[1]])


@torch.no_grad()
def two_pass_reference(model, inputs, neg_text, scale=SCALE, tau=TAU, alpha=ALPHA):
    """FLUX.2 with NAG written out plainly: one image stream, the prompt's and the negative's text streams, every
    block run on the negative stream first (recording ``Z-``), then on the prompt's (image gets ``NAG(Z+, Z-)``).
    The negative's text ids are the pipelines' ``(0, 0, 0, j)``."""
    x = model.x_embedder(inputs["hidden_states"])
    t = inputs["timestep"].to(x.dtype) * 1000
    guidance = inputs.get("guidance")
    temb = model.time_guidance_embed(t, None if guidance is None else guidance.to(x.dtype) * 1000)
    mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    txt_p, txt_n = model.context_embedder(inputs["encoder_hidden_states"]), model.context_embedder(neg_text)
    lp, ln = txt_p.shape[1], txt_n.shape[1]
    img_ids, txt_ids = _two_d(inputs["img_ids"]), _two_d(inputs["txt_ids"])
    neg_ids = torch.zeros(ln, 4, dtype=txt_ids.dtype)
    neg_ids[:, 3] = torch.arange(ln)
    rope_p, rope_n = _rope(model, txt_ids, img_ids), _rope(model, neg_ids, img_ids)
    seen = {}

    def record(z):
        seen["z"] = z
        return z

    def guide(z):
        return reference_nag(z, seen["z"], scale, tau, alpha)

    for blk in model.transformer_blocks:
        common = dict(temb_mod_img=mod_img, temb_mod_txt=mod_txt)
        with swapped(blk.attn.to_out, "0", Tap(blk.attn.to_out[0], record)):
            txt_n, _ = blk(hidden_states=x, encoder_hidden_states=txt_n, image_rotary_emb=rope_n, **common)
        with swapped(blk.attn.to_out, "0", Tap(blk.attn.to_out[0], guide)):
            txt_p, x = blk(hidden_states=x, encoder_hidden_states=txt_p, image_rotary_emb=rope_p, **common)

    for blk in model.single_transformer_blocks:
        inner = blk.attn.inner_dim

        def record_single(h, t=ln, inner=inner):
            seen["z"] = h[:, t:, :inner]
            return h

        def guide_single(h, t=lp, inner=inner):
            z = reference_nag(h[:, t:, :inner], seen["z"], scale, tau, alpha)
            return torch.cat([h[:, :t], torch.cat([z, h[:, t:, inner:]], dim=-1)], dim=1)

        with swapped(blk.attn, "to_out", Tap(blk.attn.to_out, record_single)):
            seq_n = blk(hidden_states=torch.cat([txt_n, x], 1), encoder_hidden_states=None, temb_mod=mod_single,
                        image_rotary_emb=rope_n)
        with swapped(blk.attn, "to_out", Tap(blk.attn.to_out, guide_single)):
            seq_p = blk(hidden_states=torch.cat([txt_p, x], 1), encoder_hidden_states=None, temb_mod=mod_single,
                        image_rotary_emb=rope_p)
        txt_n, txt_p, x = seq_n[:, :ln], seq_p[:, :lp], seq_p[:, lp:]
    return model.proj_out(model.norm_out(x, temb))


@contextlib.contextmanager
def doubled_taps(model, layout, scale=SCALE, tau=TAU, alpha=ALPHA):
    """Every attention's image output over a doubled batch becomes ``NAG(Z+, Z-)`` in both halves; ``layout`` holds
    the text length and the reference tokens of the call (``nref``: image-side tokens left untouched)."""

    def both(z):
        b = z.shape[0] // 2
        guided = reference_nag(z[:b], z[b:], scale, tau, alpha)
        return torch.cat([guided, guided])

    def edit_double(h):
        r = layout["nref"]
        return torch.cat([h[:, :r], both(h[:, r:])], dim=1)

    with contextlib.ExitStack() as stack:
        for blk in model.transformer_blocks:
            stack.enter_context(swapped(blk.attn.to_out, "0", Tap(blk.attn.to_out[0], edit_double)))
        for blk in model.single_transformer_blocks:
            inner = blk.attn.inner_dim

            def edit_single(h, inner=inner):
                start = layout["text"] + layout["nref"]
                h = h.clone()
                h[:, start:, :inner] = both(h[:, start:, :inner])
                return h

            stack.enter_context(swapped(blk.attn, "to_out", Tap(blk.attn.to_out, edit_single)))
        yield


def doubled(inputs, neg_text):
    out = {k: (torch.cat([v, v]) if k in ("hidden_states", "timestep", "guidance") else v) for k, v in inputs.items()}
    out["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], neg_text])
    return out


@torch.no_grad()
def doubled_reference(model, inputs, neg_text, nref=0, **call):
    """The model's own forward on ``[prompt rows; negative rows]`` with NAG on the image attention outputs; returns
    the prompt rows' output and whatever else the model returned (the KV cache of an extract step)."""
    layout = {"text": inputs["encoder_hidden_states"].shape[1], "nref": nref}
    with doubled_taps(model, layout):
        out = model(**doubled(inputs, neg_text), **call)
    b = inputs["hidden_states"].shape[0]
    return out[0][:b], out[1:]


# ------------------------------------------------------------------------------------------------ model level
def test_matches_reference_with_a_shorter_negative(flux2):
    model, inputs, negative = flux2
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls == {"guided": 1, "unguided": 0}
        assert (guide.state.last_packing.lp, guide.state.last_packing.ln) == (7, 5)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, two_pass_reference(model, inputs, negative["encoder_hidden_states"]),
                               atol=1e-5, rtol=1e-5)


def test_references_agree_and_fused_projections(flux2):
    """Equal lengths: the doubled-batch reference (the model's own forward) equals the two-pass one and nagkit, also
    with fused QKV projections in the double blocks."""
    model, inputs, _ = flux2
    neg = torch.randn(inputs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(5))
    ref = doubled_reference(model, inputs, neg)[0]
    torch.testing.assert_close(ref, two_pass_reference(model, inputs, neg), atol=1e-5, rtol=1e-5)
    with nagkit.apply(model, negative={"encoder_hidden_states": neg}, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), ref, atol=1e-5, rtol=1e-5)
        for blk in model.transformer_blocks:
            blk.attn.fuse_projections()
        try:
            torch.testing.assert_close(run(model, inputs), ref, atol=1e-5, rtol=1e-5)
        finally:
            for blk in model.transformer_blocks:
                blk.attn.unfuse_projections()


def test_identities(flux2):
    model, inputs, negative = flux2
    base = run(model, inputs)
    with nagkit.apply(model, negative=negative, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        guide.update(negative={"encoder_hidden_states": inputs["encoder_hidden_states"]}, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1  # scale 1 and alpha 0 are not even guided calls


def test_rows_batched_cfg_and_per_sample_negatives(flux2):
    model, inputs, negative = flux2
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        both = run(model, inputs)
    for i in range(2):
        one = {k: (v[i:i + 1] if k in ("hidden_states", "encoder_hidden_states", "timestep", "guidance") else v)
               for k, v in inputs.items()}
        with nagkit.apply(model, negative={"encoder_hidden_states": negative["encoder_hidden_states"][i:i + 1]},
                          scale=SCALE, tau=TAU, alpha=ALPHA):
            torch.testing.assert_close(run(model, one), both[i:i + 1], atol=1e-5, rtol=1e-5)
    # one call on [uncond; cond] rows (a custom CFG loop): the prompt half is found and guided, the other is plain
    g = torch.Generator().manual_seed(7)
    uncond = torch.randn(inputs["encoder_hidden_states"].shape, generator=g)
    cfg = {k: (torch.cat([v, v]) if k in ("hidden_states", "timestep", "guidance") else v) for k, v in inputs.items()}
    cfg["encoder_hidden_states"] = torch.cat([uncond, inputs["encoder_hidden_states"]])
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
    torch.testing.assert_close(out[:2], run(model, cfg)[:2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[2:], both, atol=1e-5, rtol=1e-5)


def test_window(flux2):
    model, inputs, negative = flux2
    base = run(model, inputs)  # timestep 0.7 of 1: schedule position u = 0.3
    with nagkit.apply(model, negative=negative, scale=SCALE, start=0.4, end=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
        guide.update(start=0.0, end=0.31)
        assert not torch.equal(run(model, inputs), base)
        guide.update(end=0.29)
        assert torch.equal(run(model, inputs), base)


def test_remove_restores_exactly(flux2):
    model, inputs, negative = flux2
    base = run(model, inputs)
    before = dict(model.attn_processors)
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, m.processor) and None)
               for n, m in model.named_modules() if n.endswith(".attn")]
    run(model, inputs)
    for h in handles:
        h.remove()
    assert len(seen) == 4 and all(isinstance(p, nagkit.adapters.NAGProcessor) for p in seen.values())
    assert all(model.attn_processors[k] is v for k, v in before.items())  # between calls: the model's own
    guide.remove()
    assert all(model.attn_processors[k] is v for k, v in before.items())
    assert "forward" not in model.__dict__ and not hasattr(model, "_nagkit_guide")
    assert not any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in model.modules())
    assert torch.equal(run(model, inputs), base)


def test_refusals(flux2):
    model, inputs, negative = flux2
    with pytest.raises(ValueError, match="mode='official' is not available for Flux2Transformer2DModel"):
        nagkit.apply(model, negative=negative, mode="official")

    class CustomProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            return Flux2AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    attn = model.transformer_blocks[0].attn
    original = attn.processor
    attn.set_processor(CustomProcessor())
    try:
        with pytest.raises(NotImplementedError, match="uses CustomProcessor, which nagkit cannot guide.*"
                                                      "Flux2KVAttnProcessor"):
            nagkit.apply(model, negative=negative)
    finally:
        attn.set_processor(original)
    mask = torch.ones(2, 1, 23, 23, dtype=torch.bool)
    with nagkit.apply(model, negative=negative), pytest.raises(NotImplementedError, match="attention_mask"):
        run(model, inputs, joint_attention_kwargs={"attention_mask": mask})


# ------------------------------------------------------------------------------------------------ Klein KV
def _kv_model():
    model = make_model(guidance=False)
    for blk in model.transformer_blocks:
        blk.attn.set_processor(Flux2KVAttnProcessor())
    for blk in model.single_transformer_blocks:
        blk.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def _kv_steps(model, inputs, ref_latents, ref_ids):
    """Step 0 (extract, reference tokens before the latents, as Flux2KleinKVPipeline) and step 1 (cached)."""
    extract = {**inputs, "hidden_states": torch.cat([ref_latents, inputs["hidden_states"]], 1),
               "img_ids": torch.cat([ref_ids, inputs["img_ids"]])}
    with torch.no_grad():
        out0, cache = model(**extract, kv_cache_mode="extract", num_ref_tokens=ref_latents.shape[1])
        out1 = model(**{**inputs, "timestep": inputs["timestep"] * 0.5}, kv_cache=cache, kv_cache_mode="cached")[0]
    return out0, cache, out1


def test_klein_kv_extract_and_cached_match_reference():
    model = _kv_model()
    inputs = make_inputs(guidance=False)
    g = torch.Generator().manual_seed(3)
    ref_latents = torch.randn(2, 8, 8, generator=g)
    ref_ids = _ids(torch.tensor([10]), torch.arange(2), torch.arange(4), torch.arange(1))
    neg = torch.randn(inputs["encoder_hidden_states"].shape, generator=g)
    plain0, plain_cache, plain1 = _kv_steps(model, inputs, ref_latents, ref_ids)
    with nagkit.apply(model, negative={"encoder_hidden_states": neg}, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out0, cache, out1 = _kv_steps(model, inputs, ref_latents, ref_ids)
        assert guide.state.calls == {"guided": 2, "unguided": 0}
    nref = ref_latents.shape[1]
    extract = {**inputs, "hidden_states": torch.cat([ref_latents, inputs["hidden_states"]], 1),
               "img_ids": torch.cat([ref_ids, inputs["img_ids"]])}
    ref0, (ref_cache,) = doubled_reference(model, extract, neg, nref=nref, kv_cache_mode="extract",
                                           num_ref_tokens=nref)
    ref1, _ = doubled_reference(model, {**inputs, "timestep": inputs["timestep"] * 0.5}, neg, kv_cache=ref_cache,
                                kv_cache_mode="cached")
    assert (out1 - plain1).abs().max() > 1e-3
    torch.testing.assert_close(out0, ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, ref1, atol=1e-5, rtol=1e-5)
    # the cached reference K/V do not depend on the text: nagkit's equal the plain model's
    for mine, plain in zip(cache.double_block_caches + cache.single_block_caches,
                           plain_cache.double_block_caches + plain_cache.single_block_caches, strict=True):
        torch.testing.assert_close(mine.k_ref, plain.k_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.v_ref, plain.v_ref, atol=1e-6, rtol=1e-6)
    # [uncond; cond] rows in one call: the prompt half is guided (reference keys too), the other half stays plain
    uncond = torch.randn(inputs["encoder_hidden_states"].shape, generator=g)
    cfg = {k: (torch.cat([v, v]) if k in ("hidden_states", "timestep") else v) for k, v in inputs.items()}
    cfg["encoder_hidden_states"] = torch.cat([uncond, inputs["encoder_hidden_states"]])
    refs = torch.cat([ref_latents, ref_latents])
    cfg_plain0, _, cfg_plain1 = _kv_steps(model, cfg, refs, ref_ids)
    with nagkit.apply(model, negative={"encoder_hidden_states": neg}, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        cfg0, _, cfg1 = _kv_steps(model, cfg, refs, ref_ids)
        assert guide.state.last_packing.rows == slice(2, 4)
    for mixed, plain, guided in ((cfg0, cfg_plain0, out0), (cfg1, cfg_plain1, out1)):
        torch.testing.assert_close(mixed[:2], plain[:2], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mixed[2:], guided, atol=1e-5, rtol=1e-5)
    # identities: scale 1 is the plain model bit for bit; negative == prompt reproduces it
    with nagkit.apply(model, negative={"encoder_hidden_states": neg}, scale=1.0) as guide:
        a0, _, a1 = _kv_steps(model, inputs, ref_latents, ref_ids)
        assert torch.equal(a0, plain0) and torch.equal(a1, plain1)
        guide.update(negative={"encoder_hidden_states": inputs["encoder_hidden_states"]}, scale=SCALE, alpha=ALPHA)
        b0, _, b1 = _kv_steps(model, inputs, ref_latents, ref_ids)
    torch.testing.assert_close(b0, plain0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b1, plain1, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def pipes():
    return {name: TINY_PIPELINES[name](seed=0) for name in ("tiny-flux2-klein", "tiny-flux2-dev")}


def generate(name, pipe, prompt=PROMPT, seeds=(0,), steps=2, **kwargs):
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type="latent")
    call.setdefault("guidance_scale", 1.0)  # Klein: no CFG unless asked; dev: embedded guidance 1
    call.update(kwargs)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, generator=generator, **call)[0]


@pytest.mark.parametrize("name", ["tiny-flux2-klein", "tiny-flux2-dev"])
def test_pipeline_guides_identities_and_removal(pipes, name):
    pipe = pipes[name]
    base = generate(name, pipe)
    before = dict(pipe.transformer.attn_processors)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5)
    assert guide.config.tau == 2.5  # the flux2 preset
    guided = generate(name, pipe)
    assert guide.state.calls == {"guided": 2, "unguided": 0}
    assert (guided - base).abs().max() > 1e-4
    guide.update(scale=1.0)
    assert torch.equal(generate(name, pipe), base)
    guide.update(negative_prompt=PROMPT, scale=5.0)
    torch.testing.assert_close(generate(name, pipe), base, atol=1e-5, rtol=1e-5)
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(generate(name, pipe), base)


def test_default_negative_is_the_empty_prompt(pipes):
    """Without a negative prompt nagkit uses "" (the Klein pipelines' own hard-coded CFG negative)."""
    name, pipe = "tiny-flux2-dev", pipes["tiny-flux2-dev"]
    with nagkit.apply(pipe, scale=5.0, alpha=0.5):
        default = generate(name, pipe)
    with nagkit.apply(pipe, negative_prompt="", scale=5.0, alpha=0.5) as guide:
        assert torch.equal(generate(name, pipe), default)
        assert (guide.state.last_packing.lp, guide.state.last_packing.ln) == (64, 64)
    with nagkit.apply(pipe, scale=5.0, alpha=0.5, negative_max_length=24) as guide:  # shorter: pads are keys, differs
        short = generate(name, pipe, num_images_per_prompt=2, seeds=(0, 0))
        assert (guide.state.last_packing.ln, guide.state.last_packing.batch) == (24, 2)
    assert torch.equal(short[0], short[1]) and not torch.allclose(short[:1], default, atol=1e-6)


def test_klein_cfg_guides_only_the_conditional_call(pipes):
    name, pipe = "tiny-flux2-klein", pipes["tiny-flux2-klein"]
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        base_final = generate(name, pipe, guidance_scale=3.0)
        base = list(outputs)
        outputs.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
            final = generate(name, pipe, guidance_scale=3.0)
            assert guide.state.calls == {"guided": 2, "unguided": 2}
    finally:
        handle.remove()
    assert (final - base_final).abs().max() > 1e-4
    assert torch.equal(outputs[1], base[1])  # the first step's unconditional call is untouched
    assert (outputs[0] - base[0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tiny-flux2-klein", "tiny-flux2-dev"])
def test_pipeline_per_sample_negatives_equal_single_runs(pipes, name):
    pipe = pipes[name]
    prompts, negatives = [PROMPT, "a blue dog running in the snow"], [NEGATIVE, "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        batch = generate(name, pipe, prompt=prompts, seeds=(0, 1))
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(name, pipe, prompt=prompts[i], seeds=(i,))
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)


class _Stop(Exception):
    pass


def _captured_inputs(pipe, name, **call):
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            generate(name, pipe, **call)
    finally:
        handle.remove()
    return {**seen, "return_dict": False, "joint_attention_kwargs": None}


@pytest.mark.parametrize("name", ["tiny-flux2-klein", "tiny-flux2-dev"])
def test_pipeline_denoiser_inputs_match_reference(pipes, name):
    """Real denoiser inputs (3-D ids, dev guidance; Klein with a reference image in the image segment) and a negative
    encoded by the pipeline at another length."""
    pipe = pipes[name]
    call = {"image": tiny_condition_image(64, 64)} if "klein" in name else {}
    inputs = _captured_inputs(pipe, name, **call)
    if call:
        assert inputs["img_ids"][0, -1, 0] == 10  # reference tokens after the latents
    neg, neg_ids = pipe.encode_prompt(NEGATIVE, max_sequence_length=24)
    assert torch.equal(neg_ids[0], _ids(*(torch.arange(1),) * 3, torch.arange(24)))
    with nagkit.apply(pipe.transformer, negative={"encoder_hidden_states": neg}, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(pipe.transformer, inputs)
    torch.testing.assert_close(out, two_pass_reference(pipe.transformer, inputs, neg), atol=1e-5, rtol=1e-5)


def test_klein_inpaint_pipeline():
    pipe = tiny_flux2_klein_inpaint_pipeline(seed=0)
    image = tiny_condition_image(64, 64)
    mask = tiny_condition_image(64, 64, seed=1).convert("L")
    call = dict(prompt=PROMPT, image=image, mask_image=mask, height=64, width=64, max_sequence_length=48,
                num_inference_steps=3, strength=1.0, guidance_scale=3.0, output_type="latent")
    base = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
        assert guide.state.calls == {"guided": 3, "unguided": 3}
        guide.update(negative_prompt=PROMPT)
        same = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
    assert (guided - base).abs().max() > 1e-4
    torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)


def test_klein_kv_pipeline():
    pipe = tiny_flux2_klein_kv_pipeline(seed=0)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, Flux2KVAttnProcessor)
    call = dict(prompt=PROMPT, image=tiny_condition_image(64, 64), height=64, width=64, max_sequence_length=48,
                num_inference_steps=3, output_type="latent")
    base = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5)
    guided = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
    assert guide.state.calls == {"guided": 3, "unguided": 0}
    assert (guided - base).abs().max() > 1e-4
    guide.update(scale=1.0)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0))[0], base)
    guide.update(negative_prompt=PROMPT, scale=5.0)
    torch.testing.assert_close(pipe(**call, generator=torch.Generator().manual_seed(0))[0], base, atol=1e-5,
                               rtol=1e-5)
    guide.remove()
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0))[0], base)


# ------------------------------------------------------------------------------------------------ nagkit bench
def test_bench_configs_and_flop_counts():
    """The shipped configs build the published models on the meta device; on a tiny FLUX.2 config nagkit's FLOPs are
    the analytic minimum and two full attentions per layer cost exactly the image→image attention once more."""
    from nagkit.bench import FamilySpec, Geometry, build_inputs, load_families, run_family
    from nagkit.bench import flops as bench_flops

    families = load_families()
    for name, params, width in (("flux2-dev", 32_223_281_152, 15360), ("flux2-klein", 3_875_544_576, 7680)):
        spec = families[name]
        model = bench_flops.build_model(spec)
        assert type(model).__name__ == "Flux2Transformer2DModel" and model.device.type == "meta"
        assert bench_flops.parameter_count(model) == params
        kwargs = build_inputs(spec).kwargs
        assert kwargs["hidden_states"].shape == (1, 4096, 128) and kwargs["encoder_hidden_states"].shape[1:] == (512,
                                                                                                                width)
        assert ("guidance" in kwargs) == (name == "flux2-dev")
    dev = families["flux2-dev"]
    tiny = FamilySpec(
        name="tiny-flux2", title="tiny FLUX.2", source="test", model_class="Flux2Transformer2DModel",
        attention="joint", inputs="flux2",
        config={"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                "num_attention_heads": 2, "joint_attention_dim": 24, "timestep_guidance_channels": 32,
                "axes_dims_rope": [4, 4, 4, 4]},
        geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=4, text_tokens=8, text_dim=24),
        text_linears=dev.text_linears, joint_attention=dev.joint_attention)
    result = run_family(tiny)
    variants = result.variants
    assert result.nag_supported and result.nag_minus_min == 0
    assert variants["none"].flops < variants["nag"].flops < variants["official"].flops
    model = bench_flops.build_model(tiny)
    assert variants["official"].flops - variants["nag"].flops == bench_flops.shared_image_attention_flops(
        model, tiny, single_blocks=True)
