"""HunyuanVideo (image-first joint attention, token refiner, text mask turned into a length, I2V conditioning): nagkit
vs a plain two-stream reference, identities, rows, windows, removal, the tiny pipelines, refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

import nagkit
from nagkit.adapters.base import PIPELINES
from nagkit.adapters.hunyuanvideo import (
    NAGHunyuanVideoAttnProcessor2_0,
    tiny_hunyuan_skyreels_pipeline,
    tiny_hunyuanvideo_transformer,
)
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .reference import reference_nag

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
NAME = "tiny-hunyuanvideo"
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


# ------------------------------------------------------------------------------------------------ reference
def _keys(mask, image_len):
    """The model's rule: video tokens and the first ``sum(mask)`` text tokens are keys; ``(B, I + L)`` bool."""
    length = mask.sum(1)
    text = torch.arange(mask.shape[1])[None] < length[:, None]
    return torch.cat([torch.ones(mask.shape[0], image_len, dtype=torch.bool), text], dim=1)


class RefProcessor:
    """HunyuanVideo attention written out (explicit softmax in float64). Mode ``"neg"`` records the video queries'
    output ``Z-``; mode ``"pos"`` replaces the video output by ``NAG(Z+, Z-)`` (before the output projection)."""

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
        image, text = out[:, :li], out[:, li:]
        if self.shared["mode"] == "neg":
            self.shared["z_neg"] = image
        else:
            cfg = self.shared["cfg"]
            image = reference_nag(image, self.shared["z_neg"], *cfg)
        if getattr(attn, "to_out", None) is not None:
            image = attn.to_out[1](attn.to_out[0](image))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return image, text


@torch.no_grad()
def hunyuan_reference(model, inputs, negative, scale=SCALE, tau=TAU, alpha=ALPHA):
    """NAG on HunyuanVideo written out with two streams: each text goes through the model's token refiner alone
    (its own mask); in every block the negative's ``[I | Tn]`` stream runs first (its own key mask, the prompt's
    ``temb``) and records ``Z-``; then the prompt's ``[I | Tp]`` stream runs with ``NAG(Z+, Z-)`` on the video
    tokens; the video stream continues from the prompt's."""
    hidden, t = inputs["hidden_states"], inputs["timestep"]
    batch = hidden.shape[0]
    neg = negative["encoder_hidden_states"].expand(batch, -1, -1)
    neg_mask = negative["encoder_attention_mask"].expand(batch, -1)
    b, c, f, h, w = hidden.shape
    temb, token_replace = model.time_text_embed(t, inputs["pooled_projections"], inputs.get("guidance"))
    rope = model.rope(hidden)
    x = model.x_embedder(hidden)
    li = x.shape[1]
    tp = model.context_embedder(inputs["encoder_hidden_states"], t, inputs["encoder_attention_mask"])
    tn = model.context_embedder(neg, t, neg_mask)
    kp, kn = _keys(inputs["encoder_attention_mask"], li), _keys(neg_mask, li)
    shared = {"cfg": (scale, tau, alpha)}
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    saved = [blk.attn.processor for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.processor = RefProcessor(shared)
        for blk in blocks:
            shared["mode"] = "neg"
            _, tn = blk(x, tn, temb, kn, rope, token_replace, h * w)
            shared["mode"] = "pos"
            x, tp = blk(x, tp, temb, kp, rope, token_replace, h * w)
    finally:
        for blk, proc in zip(blocks, saved, strict=True):
            blk.attn.processor = proc
    x = model.proj_out(model.norm_out(x, temb))
    p, pt = model.config.patch_size, model.config.patch_size_t
    x = x.reshape(b, f // pt, h // p, w // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ------------------------------------------------------------------------------------------------ fixtures
def _randomise(model):
    with torch.no_grad():  # zero-initialised modulation/gates: random, so nothing is trivial
        for name, p in model.named_parameters():
            if ("norm" in name or "adaLN" in name or "linear" in name) and p.abs().sum() == 0:
                p.normal_(0.0, 0.3)
    return model


def _model(**kwargs):
    return _randomise(tiny_hunyuanvideo_transformer(0, num_layers=2, num_single_layers=2, **kwargs))


def _inputs(in_channels=4, lp=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = 2
    mask = torch.ones(b, lp, dtype=torch.long)
    mask[0, 4:] = 0  # right padding, as the Llama tokenizer pads
    return dict(hidden_states=torch.randn(b, in_channels, 2, 4, 4, generator=g),
                timestep=torch.tensor([700.0, 700.0]), encoder_hidden_states=torch.randn(b, lp, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(b, 8, generator=g),
                guidance=torch.tensor([6000.0, 6000.0]), return_dict=False)


def _negative(ln=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])[:, :ln]
    return {"encoder_hidden_states": torch.randn(2, ln, 16, generator=g), "encoder_attention_mask": mask}


@pytest.fixture(scope="module")
def hv():
    return _model(), _inputs(), _negative()


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


# ------------------------------------------------------------------------------------------------ denoiser level
def test_reference_reproduces_the_model_at_identity(hv):
    model, inputs, _ = hv
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    torch.testing.assert_close(hunyuan_reference(model, inputs, same), run(model, inputs), atol=1e-5, rtol=1e-5)


def test_matches_reference_with_masks_and_per_sample_negatives(hv):
    model, inputs, negative = hv
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        packing = guide.state.last_packing
        assert guide.state.calls == {"guided": 1, "unguided": 0}
    assert (packing.lp, packing.ln) == (7, 4)  # the column padded in every row is dropped (exact)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, hunyuan_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)
    # batch 2 with per-sample negatives: each row equals the row alone with its negative
    for i in range(2):
        row = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        neg = {k: v[i:i + 1] for k, v in negative.items()}
        with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
            torch.testing.assert_close(run(model, row), out[i:i + 1], atol=1e-5, rtol=1e-5)


def test_longer_unpadded_negative(hv):
    model, inputs, _ = hv
    g = torch.Generator().manual_seed(3)
    negative = {"encoder_hidden_states": torch.randn(1, 11, 16, generator=g),
                "encoder_attention_mask": torch.ones(1, 11, dtype=torch.long)}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.last_packing.ln == 11
    torch.testing.assert_close(out, hunyuan_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_refiner_sees_each_text_alone(hv):
    """The text entering block 0 is ``[refined prompt | refined negative]``, each refined alone with its own mask."""
    model, inputs, negative = hv
    seen = {}

    def grab(module, args):
        seen["text"] = args[1].detach().clone()

    handle = model.transformer_blocks[0].register_forward_pre_hook(grab)
    try:
        run(model, inputs)
        plain = seen["text"]
        with nagkit.apply(model, negative=negative, scale=SCALE):
            run(model, inputs)
    finally:
        handle.remove()
    neg, mask = negative["encoder_hidden_states"][:, :4], negative["encoder_attention_mask"][:, :4]
    with torch.no_grad():
        alone = model.context_embedder(neg, inputs["timestep"], mask)
    torch.testing.assert_close(seen["text"][:, :7], plain, atol=0, rtol=0)
    torch.testing.assert_close(seen["text"][:, 7:], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["token_replace", "latent_concat"])
def test_image_to_video_conditioning(kind):
    """I2V transformers (first frame as clean tokens with their own modulation / image latents on the channels): the
    conditioning is on the video side, never negated; nagkit equals the reference."""
    if kind == "token_replace":
        model, inputs = _model(image_condition_type="token_replace"), _inputs()
    else:
        model, inputs = _model(in_channels=8, image_condition_type="latent_concat"), _inputs(in_channels=8)
    negative = _negative()
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, inputs)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, hunyuan_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_identities_window_and_removal(hv):
    model, inputs, negative = hv
    plain = run(model, inputs)
    originals = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "set_processor")}
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_attention_mask": inputs["encoder_attention_mask"]}
    with nagkit.apply(model, negative=negative, scale=1.0):
        assert torch.equal(run(model, inputs), plain)  # scale 1: plain forward, bit for bit
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=0.0):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=1e-5)
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=1e-5)
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


def test_unsupported_processor_is_refused(hv):
    model, inputs, negative = hv
    attn = model.transformer_blocks[0].attn
    original = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises((NotImplementedError, TypeError), match="AttnProcessor2_0"):
            with nagkit.apply(model, negative=negative, scale=SCALE):
                run(model, inputs)
    finally:
        attn.set_processor(original)
    # FramePack (HunyuanVideoFramepackTransformer3DModel) has its own family: tests/test_hunyuanvideo_framepack.py
    for name in ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"):
        assert PIPELINES[name].mask_index == 2 and PIPELINES[name].count_arg == "num_videos_per_prompt"


# ------------------------------------------------------------------------------------------------ pipeline level
@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES[NAME](seed=0)


def generate(pipe, name=NAME, steps=2, cfg=1.0, **kwargs):
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type="latent", true_cfg_scale=cfg)
    call.update(kwargs)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0]


def test_pipeline_guides_cfg_and_removes(pipe):
    plain = generate(pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0):
        assert torch.equal(generate(pipe), plain)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA)
    try:
        guided = generate(pipe)
        assert (guided - plain).abs().max() > 1e-4
        assert guide.state.calls == {"guided": 2, "unguided": 0}
        # true CFG: the "uncond" call stays plain; the conditional call is the one guided
        generate(pipe, cfg=3.0, negative_prompt="ugly")
        assert guide.state.calls == {"guided": 4, "unguided": 2}
    finally:
        guide.remove()
    assert torch.equal(generate(pipe), plain)
    assert not any(isinstance(m.processor, NAGHunyuanVideoAttnProcessor2_0)
                   for m in pipe.transformer.modules() if hasattr(m, "set_processor"))


def test_pipeline_cfg_uncond_is_plain(pipe):
    """With CFG, each step's unconditional prediction equals the plain model's (NAG only in the cond call)."""
    outs = {}

    def grab(key):
        def hook(module, args, kwargs, output):
            outs.setdefault(key, []).append(output[0].detach().clone())
        return hook

    handle = pipe.transformer.register_forward_hook(grab("plain"), with_kwargs=True)
    try:
        generate(pipe, steps=1, cfg=3.0, negative_prompt="ugly")
    finally:
        handle.remove()
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE):
        handle = pipe.transformer.register_forward_hook(grab("nag"), with_kwargs=True)
        try:
            generate(pipe, steps=1, cfg=3.0, negative_prompt="ugly")
        finally:
            handle.remove()
    assert torch.equal(outs["nag"][1], outs["plain"][1])  # uncond call: bit-identical
    assert not torch.equal(outs["nag"][0], outs["plain"][0])


def test_skyreels_image_to_video_pipeline():
    sky = tiny_hunyuan_skyreels_pipeline(seed=0)
    call = dict(TINY_CALL_KWARGS[NAME], image=tiny_condition_image(32, 32), num_inference_steps=1,
                output_type="latent", true_cfg_scale=1.0)
    plain = sky(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0]
    with nagkit.apply(sky, negative_prompt=NEGATIVE, scale=SCALE) as guide:
        out = sky(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0]
        assert guide.state.calls["guided"] == 1
    assert out.shape == plain.shape and (out - plain).abs().max() > 1e-5
    assert torch.equal(sky(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)[0], plain)


def test_image_to_video_pipeline_llava():
    """HunyuanVideoImageToVideoPipeline (Llava encoder sees the image; token_replace transformer): NAG guides the
    conditional call; the CFG call (black-image negative, unnamed) stays plain; scale 1 and removal are exact."""
    i2v = TINY_PIPELINES["tiny-hunyuanvideo-i2v"](seed=0)
    call = dict(TINY_CALL_KWARGS["tiny-hunyuanvideo-i2v"], image=tiny_condition_image(32, 32), num_inference_steps=1,
                output_type="latent")

    def go(**kwargs):
        return i2v(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**call, **kwargs})[0]

    plain, plain_cfg = go(), go(true_cfg_scale=3.0, negative_prompt="ugly")
    with nagkit.apply(i2v, negative_prompt=NEGATIVE, scale=1.0):
        assert torch.equal(go(), plain)
    with nagkit.apply(i2v, negative_prompt=NEGATIVE, scale=SCALE) as guide:
        out = go()
        assert guide.state.calls == {"guided": 1, "unguided": 0}
        negative = guide.state.last_packing
        out_cfg = go(true_cfg_scale=3.0, negative_prompt="ugly")
        assert guide.state.calls == {"guided": 2, "unguided": 1}  # the unconditional call is recognised
    assert negative.ln > 2  # the negative's text carries the (interleaved) image tokens of the call's image too
    assert (out - plain).abs().max() > 1e-5 and (out_cfg - plain_cfg).abs().max() > 1e-5
    assert torch.equal(go(), plain)
