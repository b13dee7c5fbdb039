"""HunyuanVideo FramePack (HunyuanVideo's joint attention with clean history latents on the video side and SigLIP
image tokens prepended to the text; a batch-1 call crops the text to its mask's length): nagkit vs a plain two-stream
reference, rows, identities, window, removal, the tiny pipeline, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

import nagkit
from nagkit.adapters import find_adapter
from nagkit.adapters.base import PIPELINES
from nagkit.adapters.hunyuanvideo import NAGHunyuanVideoAttnProcessor2_0
from nagkit.adapters.hunyuanvideo_framepack import tiny_hunyuanvideo_framepack_transformer
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .reference import reference_nag

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
NAME = "tiny-hunyuanvideo-framepack"
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"
S = 3  # SigLIP image tokens of the denoiser-level inputs


# ------------------------------------------------------------------------------------------------ reference
def _text_keys(mask):
    """The model's rule for a text segment: its first ``sum(mask)`` tokens are keys; ``(B, L)`` bool."""
    return torch.arange(mask.shape[1])[None] < mask.sum(1)[:, None]


class RefProcessor:
    """HunyuanVideo attention written out (explicit softmax in float64) over ``[video | SigLIP | text]``. The image
    side is the video tokens and the ``S`` SigLIP tokens at the head of the context stream. Mode ``"neg"`` records
    the image side's output ``Z-``; mode ``"pos"`` replaces it by ``NAG(Z+, Z-)`` (before the output projections)."""

    def __init__(self, shared):
        self.shared = shared

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        li = hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], 1) if single else hidden_states
        heads = attn.heads
        q = attn.norm_q(attn.to_q(x).unflatten(2, (heads, -1)))
        k = attn.norm_k(attn.to_k(x).unflatten(2, (heads, -1)))
        v = attn.to_v(x).unflatten(2, (heads, -1))
        q = torch.cat([apply_rotary_emb(q[:, :li], image_rotary_emb, sequence_dim=1), q[:, li:]], 1)
        k = torch.cat([apply_rotary_emb(k[:, :li], image_rotary_emb, sequence_dim=1), k[:, li:]], 1)
        if not single:
            q = torch.cat([q, attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1)))], 1)
            k = torch.cat([k, attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1)))], 1)
            v = torch.cat([v, attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))], 1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(x.dtype).flatten(2, 3)
        side = li + self.shared["s"]
        image, rest = out[:, :side], out[:, side:]
        if self.shared["mode"] == "neg":
            self.shared["z_neg"] = image
        else:
            image = reference_nag(image, self.shared["z_neg"], *self.shared["cfg"])
        video, text = image[:, :li], torch.cat([image[:, li:], rest], 1)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


@torch.no_grad()
def framepack_reference(model, inputs, negative, scale=SCALE, tau=TAU, alpha=ALPHA):
    """NAG on FramePack written out with two streams: the video stream ``[history | noisy]``; each text refined by
    the token refiner alone (its own mask); the SigLIP tokens ``S`` projected once. In every block the negative's
    ``[video | S | Tn]`` runs first (the prompt stream's current ``S``, its own key mask, the prompt's ``temb``) and
    records ``Z-`` of the video and ``S`` queries; then the prompt's ``[video | S | Tp]`` runs with ``NAG(Z+, Z-)`` on
    them; the video stream and ``S`` continue from the prompt's, ``Tn`` from the negative's."""
    hidden, t = inputs["hidden_states"], inputs["timestep"]
    b, c, f, h, w = hidden.shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    neg = negative["encoder_hidden_states"].expand(b, -1, -1)
    neg_mask = negative["encoder_attention_mask"].expand(b, -1)
    x = model.x_embedder(hidden)
    rope = model.rope(inputs["indices_latents"], h, w, x.device)
    clean, h2, h4 = model.clean_x_embedder(inputs["latents_clean"], inputs["latents_history_2x"],
                                           inputs["latents_history_4x"])
    ropes = [model.rope(inputs[key], h, w, x.device) for key in
             ("indices_latents_clean", "indices_latents_history_2x", "indices_latents_history_4x")]
    x, rope = model._pack_history_states(x, clean, h2, h4, rope, *ropes, h // p, w // p)
    temb, _ = model.time_text_embed(t, inputs["pooled_projections"], inputs.get("guidance"))
    tp = model.context_embedder(inputs["encoder_hidden_states"], t, inputs["encoder_attention_mask"])
    tn = model.context_embedder(neg, t, neg_mask)
    s = model.image_projection(inputs["image_embeds"])
    side = torch.ones(b, x.shape[1] + s.shape[1], dtype=torch.bool)
    kp = torch.cat([side, _text_keys(inputs["encoder_attention_mask"])], 1)
    kn = torch.cat([side, _text_keys(neg_mask)], 1)
    shared = {"cfg": (scale, tau, alpha), "s": s.shape[1]}
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    saved = [blk.attn.processor for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.processor = RefProcessor(shared)
        for blk in blocks:
            shared["mode"] = "neg"
            _, context = blk(x, torch.cat([s, tn], 1), temb, kn, rope)
            tn = context[:, s.shape[1]:]
            shared["mode"] = "pos"
            x, context = blk(x, torch.cat([s, tp], 1), temb, kp, rope)
            s, tp = context[:, :s.shape[1]], context[:, s.shape[1]:]
    finally:
        for blk, proc in zip(blocks, saved, strict=True):
            blk.attn.processor = proc
    x = model.proj_out(model.norm_out(x[:, -(f // pt) * (h // p) * (w // p):], temb))
    x = x.reshape(b, f // pt, h // p, w // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ------------------------------------------------------------------------------------------------ fixtures
def _randomise(model):
    with torch.no_grad():  # zero-initialised modulation/gates: random, so nothing is trivial
        for name, p in model.named_parameters():
            if ("norm" in name or "adaLN" in name or "linear" in name) and p.abs().sum() == 0:
                p.normal_(0.0, 0.3)
    return model


def _inputs(lp=7, seed=1, b=2):
    """Two rows (prompt of row 0 right-padded) of a vanilla-layout FramePack call: a 2-frame 4x4 noisy window,
    clean / 2x / 4x history, ``S`` SigLIP tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, lp, dtype=torch.long)
    mask[0, 4:] = 0  # right padding, as the Llama tokenizer pads
    index = torch.arange(1 + 16 + 2 + 1 + 2)

    def rand(*shape):
        return torch.randn(b, *shape, generator=g)

    return dict(hidden_states=rand(4, 2, 4, 4), timestep=torch.full((b,), 700.0),
                encoder_hidden_states=rand(lp, 16), encoder_attention_mask=mask, pooled_projections=rand(8),
                image_embeds=rand(S, 8), indices_latents=index[-2:], guidance=torch.full((b,), 6000.0),
                latents_clean=rand(4, 2, 4, 4), indices_latents_clean=torch.cat([index[:1], index[-3:-2]]),
                latents_history_2x=rand(4, 2, 4, 4), indices_latents_history_2x=index[17:19],
                latents_history_4x=rand(4, 16, 4, 4), indices_latents_history_4x=index[1:17], return_dict=False)


def _negative(ln=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])[:, :ln]
    return {"encoder_hidden_states": torch.randn(2, ln, 16, generator=g), "encoder_attention_mask": mask}


#: The inputs with a batch dimension (the frame indices have none).
BATCHED = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
           "image_embeds", "guidance", "latents_clean", "latents_history_2x", "latents_history_4x")


def _row(inputs, i):
    return {k: (v[i:i + 1] if k in BATCHED else v) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def fp():
    return _randomise(tiny_hunyuanvideo_framepack_transformer(0, num_layers=2, num_single_layers=2)), _inputs(), \
        _negative()


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def _same_as_prompt(inputs):
    return {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}


# ------------------------------------------------------------------------------------------------ denoiser level
def test_reference_reproduces_the_model_at_identity(fp):
    """The reference with ``negative == prompt`` is the plain model: batch 2 (the model's length mask) and batch 1
    with a padded prompt (the model's crop)."""
    model, inputs, _ = fp
    torch.testing.assert_close(framepack_reference(model, inputs, _same_as_prompt(inputs)), run(model, inputs),
                               atol=1e-5, rtol=1e-5)
    row = _row(inputs, 0)
    torch.testing.assert_close(framepack_reference(model, row, _same_as_prompt(row)), run(model, row),
                               atol=1e-5, rtol=1e-5)


def test_matches_reference_with_masks_and_per_sample_negatives(fp):
    model, inputs, negative = fp
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        packing = guide.state.last_packing
        assert guide.state.calls == {"guided": 1, "unguided": 0}
    assert (packing.lp, packing.ln) == (7, 4)  # the negative's column padded in every row is dropped (exact)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, framepack_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)
    # batch 2 with per-sample negatives: each row equals the row alone with its negative (batch 1: the model crops
    # the text; row 0's padded prompt and negative are trimmed first so that the crop keeps the negative)
    for i in range(2):
        neg = {k: v[i:i + 1] for k, v in negative.items()}
        with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
            torch.testing.assert_close(run(model, _row(inputs, i)), out[i:i + 1], atol=1e-5, rtol=1e-5)
            assert (guide.state.last_packing.lp, guide.state.last_packing.ln) == ((4, 3) if i == 0 else (7, 4))


def test_other_negative_length(fp):
    """A longer, unpadded negative than the prompt (and a shorter one), batch 2 and batch 1."""
    model, inputs, _ = fp
    g = torch.Generator().manual_seed(3)
    for ln in (11, 2):
        negative = {"encoder_hidden_states": torch.randn(1, ln, 16, generator=g),
                    "encoder_attention_mask": torch.ones(1, ln, dtype=torch.long)}
        with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
            out = run(model, inputs)
            assert guide.state.last_packing.ln == ln
            row = run(model, _row(inputs, 0))
        torch.testing.assert_close(out, framepack_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row, framepack_reference(model, _row(inputs, 0), negative), atol=1e-5, rtol=1e-5)


def test_context_stream_is_siglip_prompt_negative(fp):
    """The context entering block 0 is ``[S | refined prompt | refined negative]``: the SigLIP tokens once, the
    negative refined alone with its own mask (the token refiner runs per segment)."""
    model, inputs, negative = fp
    seen = {}

    def grab(module, args):
        seen["context"] = args[1].detach().clone()

    handle = model.transformer_blocks[0].register_forward_pre_hook(grab)
    try:
        run(model, inputs)
        plain = seen["context"]
        with nagkit.apply(model, negative=negative, scale=SCALE):
            run(model, inputs)
    finally:
        handle.remove()
    neg, mask = negative["encoder_hidden_states"][:, :4], negative["encoder_attention_mask"][:, :4]
    with torch.no_grad():
        alone = model.context_embedder(neg, inputs["timestep"], mask)
    assert seen["context"].shape[1] == S + 7 + 4
    torch.testing.assert_close(seen["context"][:, :S + 7], plain, atol=0, rtol=0)
    torch.testing.assert_close(seen["context"][:, S + 7:], alone, atol=1e-6, rtol=1e-6)


def test_cfg_rows_untouched(fp):
    """A batched ``[uncond, cond]`` call (negative of 2 rows, batch 4): the guided half equals the reference, the
    unconditional half the plain model."""
    model, inputs, negative = fp
    g = torch.Generator().manual_seed(4)
    uncond = {**inputs, "encoder_hidden_states": torch.randn(2, 7, 16, generator=g)}
    batched = {k: (torch.cat([uncond[k], v]) if k in BATCHED else v) for k, v in inputs.items()}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, batched)
        assert guide.state.last_packing.rows == slice(2, 4)
    torch.testing.assert_close(out[:2], run(model, uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], framepack_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_identities_window_and_removal(fp):
    model, inputs, negative = fp
    plain = run(model, inputs)
    originals = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "set_processor")}
    with nagkit.apply(model, negative=negative, scale=1.0):
        assert torch.equal(run(model, inputs), plain)  # scale 1: plain forward, bit for bit
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=0.0):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=1e-5)
    with nagkit.apply(model, negative=_same_as_prompt(inputs), scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=1e-5)
    row = _row(inputs, 0)  # batch 1, padded prompt: the model's crop path
    with nagkit.apply(model, negative=_same_as_prompt(row), scale=SCALE, tau=TAU, alpha=ALPHA):
        guided_row = run(model, row)
    torch.testing.assert_close(guided_row, run(model, row), atol=1e-5, rtol=1e-5)
    # window: u = 1 - t/1000; t = 700 -> u = 0.3
    with nagkit.apply(model, negative=negative, scale=SCALE, start=0.5) as guide:
        assert torch.equal(run(model, inputs), plain)
        assert guide.state.calls["guided"] == 0
    with nagkit.apply(model, negative=negative, scale=SCALE, end=0.5) as guide:
        assert not torch.equal(run(model, inputs), plain)
        assert guide.state.calls["guided"] == 1
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    run(model, inputs)
    guide.remove()
    assert torch.equal(run(model, inputs), plain)
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "set_processor")} == originals
    assert not any(isinstance(m.processor, NAGHunyuanVideoAttnProcessor2_0)
                   for m in model.modules() if hasattr(m, "set_processor"))


def test_refusals(fp):
    model, inputs, negative = fp
    assert find_adapter(model).family == "hunyuanvideo-framepack"
    attn = model.single_transformer_blocks[0].attn
    original = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises((NotImplementedError, TypeError), match="AttnProcessor2_0"):
            with nagkit.apply(model, negative=negative, scale=SCALE):
                run(model, inputs)
    finally:
        attn.set_processor(original)
    # batch 1 crops the text to its mask's length: a mask with a hole cannot be packed crop-safe
    row = _row(inputs, 1)
    holed = torch.tensor([[1, 1, 0, 1, 1, 1, 1]])
    with nagkit.apply(model, negative={k: v[1:] for k, v in negative.items()}, scale=SCALE):
        with pytest.raises(ValueError, match="right-padded"):
            run(model, row, encoder_attention_mask=holed)
    spec = PIPELINES["HunyuanVideoFramepackPipeline"]
    assert spec.mask_index == 2 and spec.requires_image and spec.preset == "hunyuanvideo-framepack"


def test_bench_counts_nag_at_the_analytic_minimum():
    """``nagkit bench`` on a small version of the shipped config: the forward runs on the meta device (text masks as
    CPU tensors) and NAG costs exactly the analytic minimum (history and SigLIP tokens included)."""
    from nagkit.bench.families import load_families
    from nagkit.bench.flops import run_family

    shipped = load_families()["hunyuanvideo-framepack"]
    assert shipped.config["has_image_proj"] and shipped.config["has_clean_x_embedder"]
    assert (shipped.geometry.image_tokens, shipped.geometry.image_dim) == (729, shipped.config["image_proj_dim"])
    spec, _ = shipped.for_time()
    spec = dataclasses.replace(spec, config={**spec.config, "num_single_layers": 1}).with_geometry(
        height=128, width=64, frames=5, text_tokens=16, negative_tokens=12, image_tokens=9)
    result = run_family(spec, short_negative=None)
    assert result.nag_minus_min == 0 and not result.notes
    assert 0 < result.variants["nag"].overhead < result.variants["official"].overhead


# ------------------------------------------------------------------------------------------------ pipeline level
@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES[NAME](seed=0)


def generate(pipe, steps=1, cfg=1.0, **kwargs):
    call = dict(TINY_CALL_KWARGS[NAME], image=tiny_condition_image(32, 32), num_inference_steps=steps,
                output_type="latent", true_cfg_scale=cfg)
    call.update(kwargs)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0][-1]


def test_pipeline_guides_and_removes(pipe):
    plain = generate(pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0):
        assert torch.equal(generate(pipe), plain)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA)
    try:
        guided = generate(pipe)
        assert guided.shape == plain.shape and (guided - plain).abs().max() > 1e-5
        assert guide.state.calls == {"guided": 1, "unguided": 0}
        assert guide.state.last_packing.lp < 16  # the prompt's padding (max_sequence_length 16) is trimmed
        assert torch.isfinite(generate(pipe, sampling_type="vanilla")).all()  # FramePack-F1's sampling
        assert guide.state.calls == {"guided": 2, "unguided": 0}
    finally:
        guide.remove()
    assert torch.equal(generate(pipe), plain)
    assert not any(isinstance(m.processor, NAGHunyuanVideoAttnProcessor2_0)
                   for m in pipe.transformer.modules() if hasattr(m, "set_processor"))


def test_pipeline_cfg_uncond_is_plain(pipe):
    """true CFG: the pipeline's separate (unnamed) unconditional call is recognised by its text and stays
    bit-identical to the plain model's; the conditional call is guided."""
    outs = {}

    def grab(key):
        def hook(module, args, kwargs, output):
            outs.setdefault(key, []).append(output[0].detach().clone())
        return hook

    handle = pipe.transformer.register_forward_hook(grab("plain"), with_kwargs=True)
    try:
        generate(pipe, cfg=3.0, negative_prompt="ugly")
    finally:
        handle.remove()
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE) as guide:
        handle = pipe.transformer.register_forward_hook(grab("nag"), with_kwargs=True)
        try:
            generate(pipe, cfg=3.0, negative_prompt="ugly")
        finally:
            handle.remove()
        assert guide.state.calls == {"guided": 1, "unguided": 1}
    assert torch.equal(outs["nag"][1], outs["plain"][1])  # uncond call: bit-identical
    assert not torch.equal(outs["nag"][0], outs["plain"][0])
