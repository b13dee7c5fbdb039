"""Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, block-causal single stream, side-car negative prefix): nagkit vs
an independent reference, KV-cache modes, both attention processors, identities, rows, window, removal, the
pipeline, refusals.

The reference (:func:`reference`) runs the model's math twice per layer, written out plainly here (dense
block-causal masks, explicit softmax, the NAG formula; no nagkit kernel or layout code):

* the prompt's joint sequence entering the blocks (and its RoPE, modulation, padding) is taken from a plain run of
  the model on the prompt (a pre-hook on ``transformer_blocks[0]``); the negative's joint sequence from a plain run
  of the model on the negative alone (same latents): its prefix at its own positions, the target at the frame the
  negative's prefix gives it;
* each block is written out on both sequences: full block-causal attention over each sequence; the target rows get
  ``NAG(Z+, Z-)`` with ``Z+`` from the prompt's sequence and ``Z-`` from the negative's; the prefix rows keep their
  own attention; the target stream is shared (copied into the negative's sequence after every block);
* the final norm and projection of the model on the prompt's sequence.

:func:`test_reference_is_the_model` checks that the written-out block is the model's (scale 1 gives the plain
output).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nagkit
from nagkit.adapters.qwenimage21 import NAGQwenImage21AttnProcessor, tiny_qwen21_transformer

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
C = 16  # text width of the tiny model
HW = (4, 4)  # target latent grid: 16 tokens, 4 slots


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen21_transformer(seed=0)


def slot_mask(batch, text, cond_at=None, cond_slots=0, target_slots=HW[0] * HW[1] // 4):
    """``img_mask`` ``(B, text + target_slots)``: ``cond_slots`` condition-image slots from ``cond_at`` (inside the
    text), then the target's slots."""
    m = torch.zeros(batch, text + target_slots, dtype=torch.bool)
    if cond_slots:
        m[:, cond_at:cond_at + cond_slots] = True
    m[:, text:] = True
    return m


def make_inputs(batch=1, text=7, cond=None, t=0.4, mask=None, seed=1):
    """One call's inputs; ``cond=(at, (h, w))``: a condition image of ``h·w`` latent tokens at slot ``at``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, *HW)]
    n_cond, at = 0, None
    if cond is not None:
        at, (h, w) = cond
        shapes = [(1, h, w), *shapes]
        n_cond = h * w
    return {"hidden_states": torch.randn(batch, n_cond + HW[0] * HW[1], 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, C, generator=g),
            "timestep": torch.full((batch,), t), "img_shapes": [shapes] * batch,
            "img_mask": slot_mask(batch, text, at, n_cond // 4), "encoder_hidden_states_mask": mask,
            "return_dict": False}


def negative(batch=1, text=5, cond=None, mask=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    neg = {"encoder_hidden_states": torch.randn(batch, text, C, generator=g)}
    if mask is not None:
        neg["encoder_hidden_states_mask"] = mask
    if cond is not None:
        at, (h, w) = cond
        neg["img_mask"] = slot_mask(batch, text, at, h * w // 4)[:, :text]
    return neg


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


# ------------------------------------------------------------------------------------------------ reference
def block0_inputs(model, inputs):
    """What ``transformer_blocks[0]`` receives in a plain run (no cache), and ``norm_out``'s ``temb``."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    def grab_temb(module, args):
        seen["temb"] = args[1]

    hooks = [model.transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True),
             model.norm_out.register_forward_pre_hook(grab_temb)]
    try:
        run(model, {**inputs, "kv_cache": None, "kv_cache_mode": None})
    finally:
        for h in hooks:
            h.remove()
    return seen


def block_causal(model, inputs):
    """Dense keep-mask ``(B, L, L)`` of the block-causal rule, and the target mask ``(L,)``, from the slots."""
    slots = inputs["img_mask"][0]
    pad = torch.repeat_interleave(slots, torch.where(slots, 4, 1))
    shapes = inputs["img_shapes"][0]
    ids = torch.full(pad.shape, -1)
    ids[pad] = torch.tensor([b for b, s in enumerate(shapes) for _ in range(math.prod(s))])
    n = pad.shape[0]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (q >= k) | ((ids[:, None] == ids[None, :]) & (ids[:, None] >= 0))
    target = torch.zeros(n, dtype=torch.bool)
    target[ids == len(shapes) - 1] = True
    valid = torch.ones(inputs["hidden_states"].shape[0], n, dtype=torch.bool)
    mask = inputs.get("encoder_hidden_states_mask")
    if mask is not None:
        valid[:, ~pad] = mask.bool()[:, ~slots[: mask.shape[1]]]
    return keep[None] & valid[:, None, :], target


def rows_of(params, target):
    """Per-token modulation rows: the sample's own where ``target`` (or everywhere without the t=0 row)."""
    if target is None:
        return params[:, None]
    return torch.where(target[None, :, None], params[:-1, None], params[-1:][None])


def rotate(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None]).flatten(3).type_as(x)


def dense_attention(attn, h, freqs, keep):
    b, n, _ = h.shape
    d = attn.inner_dim // attn.heads
    q = attn.norm_q(attn.to_q(h).view(b, n, -1, d))
    k = attn.norm_k(attn.to_k(h).view(b, n, -1, d))
    v = attn.to_v(h).view(b, n, -1, d)
    q, k = rotate(q, freqs), rotate(k, freqs)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def nag_formula(zp, zn, scale=SCALE, tau=TAU, alpha=ALPHA):
    zt = scale * zp - (scale - 1) * zn
    ratio = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = zt * torch.clamp(ratio, max=tau) / ratio
    return alpha * zh + (1 - alpha) * zp


def reference(model, inputs, neg, rows=None, scale=SCALE, tau=TAU, alpha=ALPHA):
    """The guided output (whole joint sequence of the prompt) of a call: prompt and negative sequences per layer.

    ``neg``: the negative in ``negative()`` form with one row per guided row; ``rows``: the guided rows (default
    all)."""
    b = inputs["hidden_states"].shape[0]
    rows = rows or slice(0, b)
    p = block0_inputs(model, inputs)
    neg_text = neg["encoder_hidden_states"]
    neg_slots = neg.get("img_mask")
    target_slots = inputs["img_mask"].shape[1] - inputs["encoder_hidden_states"].shape[1]
    g = neg_text.shape[0]
    if neg_slots is None:
        neg_slots = torch.zeros(g, neg_text.shape[1], dtype=torch.bool)
    neg_inputs = {**inputs, "hidden_states": inputs["hidden_states"][rows], "encoder_hidden_states": neg_text,
                  "timestep": inputs["timestep"][rows], "img_shapes": inputs["img_shapes"][rows],
                  "img_mask": torch.cat([neg_slots, neg_slots.new_ones(g, target_slots)], dim=1),
                  "encoder_hidden_states_mask": neg.get("encoder_hidden_states_mask")}
    n = block0_inputs(model, neg_inputs)
    keep_p, target_p = block_causal(model, inputs)
    keep_n, target_n = block_causal(model, neg_inputs)
    causal = model.config.causal_condition
    tp, tn = (target_p, target_n) if causal else (None, None)
    xp, xn = p["hidden_states"].clone(), n["hidden_states"].clone()
    lp, ln = int((~target_p).sum()), int((~target_n).sum())
    d = xp.shape[-1]
    with torch.no_grad():
        for block in model.transformer_blocks:
            xn[:, ln:] = xp[rows, lp:]
            outs = []
            for x, mod, freqs, keep, tm in ((xp, p["modulation"], p["rotary_emb"], keep_p, tp),
                                            (xn, n["modulation"], n["rotary_emb"], keep_n, tn)):
                s1, g1, s2, g2 = mod.chunk(4, dim=-1)
                h = F.layer_norm(x, (d,), eps=1e-6) * (1 + rows_of(s1, tm))
                outs.append((dense_attention(block.attn, h, freqs, keep), rows_of(g1, tm), s2, g2, tm))
            ap, an = outs[0][0], outs[1][0]
            z = ap[:, lp:].clone()
            z[rows] = nag_formula(ap[rows, lp:], an[:, ln:], scale, tau, alpha)
            ap = torch.cat([ap[:, :lp], z], dim=1)
            an = torch.cat([an[:, :ln], z[rows]], dim=1)
            new = []
            for x, a, (_, g1, s2, g2, tm) in zip((xp, xn), (ap, an), outs, strict=True):
                x = x + g1.tanh() * block.attn.to_out[0](a)
                h = F.layer_norm(x, (d,), eps=1e-6) * (1 + rows_of(s2, tm))
                new.append(x + rows_of(g2, tm).tanh() * block.img_mlp(h))
            xp, xn = new
        return model.proj_out(model.norm_out(xp, p["temb"], tp))


def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ reference checks
def test_reference_is_the_model(model):
    inputs = make_inputs(cond=(2, (2, 4)), text=9)
    plain = run(model, inputs)
    assert_close(reference(model, inputs, negative(text=5, cond=(1, (2, 4))), scale=1.0), plain)
    # the negative's own sequence, run plainly, is the model on the negative
    assert_close(reference(model, inputs, {"encoder_hidden_states": inputs["encoder_hidden_states"],
                                           "img_mask": inputs["img_mask"][:, :9]}), plain)


# ------------------------------------------------------------------------------------------------ NAG vs reference
@pytest.mark.parametrize("neg_text", [3, 7, 12])
def test_text_to_image_matches_reference(model, neg_text):
    inputs, neg = make_inputs(text=7), negative(text=neg_text)
    guide = nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA)
    try:
        out = run(model, inputs)
    finally:
        guide.remove()
    assert_close(out, reference(model, inputs, neg))
    assert (out - run(model, inputs)).abs().max() > 1e-3  # NAG changed something


def test_condition_image_matches_reference(model):
    """Condition latents at different slots of the prompt and of the negative (and a negative of another length)."""
    inputs = make_inputs(text=10, cond=(3, (2, 4)))
    neg = negative(text=6, cond=(1, (2, 4)))
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, inputs)
    assert_close(out, reference(model, inputs, neg))


def test_batch_two_per_sample_negatives_and_padding(model):
    pmask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    nmask = torch.tensor([[1] * 3 + [0] * 2, [1] * 5])
    inputs = make_inputs(batch=2, text=8, mask=pmask)
    neg = negative(batch=2, text=5, mask=nmask)
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, inputs)
    assert_close(out, reference(model, inputs, neg))


def test_kv_cache_extract_then_cached(model, monkeypatch):
    """The pipeline's cache modes: step 0 prefills both caches, later steps reuse them (the negative prefix pass runs
    once per generation); every step equals the reference."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    import nagkit.adapters.qwenimage21 as q21

    calls = []
    original = q21.negative_prefix
    monkeypatch.setattr(q21, "negative_prefix", lambda *a: calls.append(1) or original(*a))
    inputs = make_inputs(text=8, cond=(2, (2, 2)))
    neg = negative(text=5, cond=(1, (2, 2)))
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    steps, outs = (0.9, 0.6, 0.2), []
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        for step, t in enumerate(steps):
            outs.append(run(model, {**inputs, "timestep": torch.full((1,), t)}, kv_cache=cache,
                            kv_cache_mode="cached" if step else "extract"))
    assert len(calls) == 1
    assert outs[0].shape[1] > outs[1].shape[1] == HW[0] * HW[1]
    for t, out in zip(steps, outs, strict=True):
        expected = reference(model, {**inputs, "timestep": torch.full((1,), t)}, neg)
        assert_close(out, expected[:, -out.shape[1]:])


def test_kv_cache_with_a_late_start(model):
    """NAG starting after the prefill step: the first guided (cached) step makes the negative prefix."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    inputs, neg = make_inputs(text=6), negative(text=9)
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    steps, outs = (0.9, 0.5, 0.2), []
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA, start=0.3) as guide:
        for step, t in enumerate(steps):
            outs.append(run(model, {**inputs, "timestep": torch.full((1,), t)}, kv_cache=cache,
                            kv_cache_mode="cached" if step else "extract"))
        assert guide.state.calls == {"guided": 2, "unguided": 1}
    assert torch.equal(outs[0], run(model, {**inputs, "timestep": torch.full((1,), 0.9)}))
    for t, out in zip(steps[1:], outs[1:], strict=True):
        assert_close(out, reference(model, {**inputs, "timestep": torch.full((1,), t)}, neg)[:, -out.shape[1]:])


def test_without_causal_condition_recomputed_every_step(monkeypatch):
    import nagkit.adapters.qwenimage21 as q21

    model = tiny_qwen21_transformer(seed=3, causal_condition=False)
    calls = []
    original = q21.negative_prefix
    monkeypatch.setattr(q21, "negative_prefix", lambda *a: calls.append(1) or original(*a))
    inputs, neg = make_inputs(text=7, cond=(2, (2, 2))), negative(text=4, cond=(0, (2, 2)))
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        outs = [run(model, {**inputs, "timestep": torch.full((1,), t)}) for t in (0.8, 0.3)]
    assert len(calls) == 2
    for t, out in zip((0.8, 0.3), outs, strict=True):
        assert_close(out, reference(model, {**inputs, "timestep": torch.full((1,), t)}, neg))


def test_negative_prefix_is_the_models_own_prefill(model, monkeypatch):
    """Pin of the side-car: the negative prefix's keys/values in every layer equal those a plain run of the model on
    the negative alone stores in its KV cache (``extract``), and its target rotation is that run's target RoPE."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    import nagkit.adapters.qwenimage21 as q21

    made = []
    original = q21.negative_prefix
    monkeypatch.setattr(q21, "negative_prefix", lambda *a: made.append(original(*a)) or made[-1])
    inputs = make_inputs(batch=2, text=8, cond=(2, (2, 2)), mask=torch.tensor([[1] * 8, [1] * 7 + [0]]))
    nmask = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])
    neg = negative(batch=2, text=6, cond=(1, (2, 2)), mask=nmask)
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        run(model, inputs)
    alone = QwenImage21KVCache(len(model.transformer_blocks))
    neg_inputs = {**inputs, "encoder_hidden_states": neg["encoder_hidden_states"], "encoder_hidden_states_mask": nmask,
                  "img_mask": torch.cat([neg["img_mask"], torch.ones(2, 4, dtype=torch.bool)], dim=1)}
    rotary = {}
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: rotary.update(rope=kw["rotary_emb"]), with_kwargs=True)
    try:
        run(model, neg_inputs, kv_cache=alone, kv_cache_mode="extract")
    finally:
        hook.remove()
    (prefix,) = made
    for i in range(len(model.transformer_blocks)):
        for mine, theirs in zip(prefix.cache.get_layer(i).get(), alone.get_layer(i).get(), strict=True):
            assert_close(mine, theirs, atol=1e-6)
    assert torch.equal(prefix.rotary, rotary["rope"][prefix.length:])


def test_two_attentions_path(model):
    from nagkit.kernels.joint import force_two_attentions

    inputs, neg = make_inputs(text=7, cond=(1, (2, 2))), negative(text=9, cond=(4, (2, 2)))
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA), force_two_attentions():
        out = run(model, inputs)
    assert_close(out, reference(model, inputs, neg))


def test_flex_processor_guided_calls(model):
    """With ``QwenImage21FlexAttnProcessor`` installed, guided calls equal the reference (the per-segment prefill),
    and the original processors are back afterwards."""
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    inputs, neg = make_inputs(text=7), negative(text=4)
    model.set_attn_processor(QwenImage21FlexAttnProcessor())
    try:
        with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
            out = run(model, inputs)
            assert all(isinstance(b.attn.processor, QwenImage21FlexAttnProcessor) for b in model.transformer_blocks)
    finally:
        model.set_attn_processor(QwenImage21AttnProcessor())
    assert_close(out, reference(model, inputs, neg))


# ------------------------------------------------------------------------------------------------ identities, rows
def test_identities(model):
    inputs, neg = make_inputs(text=7, cond=(2, (2, 2))), negative(text=5, cond=(1, (2, 2)))
    plain = run(model, inputs)
    for kwargs in ({"scale": 1.0}, {"alpha": 0.0}):
        with nagkit.apply(model, negative=neg, **{"scale": SCALE, "tau": TAU, "alpha": ALPHA, **kwargs}):
            assert torch.equal(run(model, inputs), plain)
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"], "img_mask": inputs["img_mask"][:, :7]}
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA):
        assert_close(run(model, inputs), plain)


def test_uncond_context_and_batched_cfg_rows(model):
    inputs, neg = make_inputs(text=7), negative(text=5)
    plain = run(model, inputs)
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        with model.cache_context("uncond"):
            assert torch.equal(run(model, inputs), plain)
        assert guide.state.calls["guided"] == 0
        # a one-row negative guides every row of a bare denoiser's call
        two = make_inputs(batch=2, text=7, seed=5)
        out = run(model, two)
    assert_close(out, reference(model, two, {"encoder_hidden_states": neg["encoder_hidden_states"].expand(2, -1, -1)}))
    # 2R rows for an R-row negative: batched CFG [uncond, cond], the conditional half guided
    cfg = make_inputs(batch=4, text=7, seed=6)
    rows_neg = negative(batch=2, text=5, seed=7)
    plain_cfg = run(model, cfg)
    with nagkit.apply(model, negative=rows_neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, cfg)
    assert_close(out[:2], plain_cfg[:2], atol=1e-6)  # unconditional half: plain
    assert_close(out, reference(model, cfg, rows_neg, rows=slice(2, 4)))


def test_window(model):
    inputs, neg = make_inputs(text=7, t=0.9), negative(text=5)
    plain = run(model, inputs)
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA, start=0.5):
        assert torch.equal(run(model, inputs), plain)  # u = 1 − 0.9 = 0.1 < 0.5: outside
        late = {**inputs, "timestep": torch.full((1,), 0.2)}
        out = run(model, late)
    assert_close(out, reference(model, late, neg))


def test_removal_restores_everything(model):
    inputs, neg = make_inputs(text=7), negative(text=5)
    processors = [b.attn.processor for b in model.transformer_blocks]
    plain = run(model, inputs)
    guide = nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA)
    run(model, inputs)
    guide.remove()
    assert torch.equal(run(model, inputs), plain)
    assert [b.attn.processor for b in model.transformer_blocks] == processors
    assert not any(isinstance(b.attn.processor, NAGQwenImage21AttnProcessor) for b in model.transformer_blocks)


def test_refusals(model):
    inputs = make_inputs(text=7, cond=(2, (2, 2)))
    with nagkit.apply(model, negative=negative(text=5), scale=SCALE, tau=TAU, alpha=ALPHA):
        with pytest.raises(ValueError, match="condition images"):
            run(model, inputs)
    model.gradient_checkpointing = True
    try:
        with nagkit.apply(model, negative=negative(text=5), scale=SCALE, tau=TAU, alpha=ALPHA):
            with pytest.raises(NotImplementedError, match="gradient checkpointing"):
                model(**make_inputs(text=7))
    finally:
        model.gradient_checkpointing = False


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipe():
    from nagkit.adapters.qwenimage21 import tiny_qwen_image21_pipeline

    return tiny_qwen_image21_pipeline(seed=0)


def _call(pipe, **kwargs):
    args = {"prompt": "a red cat on a chair", "height": 64, "width": 64, "num_inference_steps": 2,
            "output_type": "latent", "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(**args).images


def test_pipeline_text_to_image_cfg_identity_removal(pipe):
    plain = _call(pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    with nagkit.apply(pipe, negative_prompt="low quality, watermark", scale=1.0) as guide:
        assert torch.equal(_call(pipe, negative_prompt="blurry", true_cfg_scale=2.0), plain)
        guide.update(scale=SCALE)
        before = dict(guide.state.calls)
        guided = _call(pipe, negative_prompt="blurry", true_cfg_scale=2.0)
        assert guide.state.calls["guided"] - before["guided"] == 2  # cond calls only
        assert guide.state.calls["unguided"] - before["unguided"] == 2  # uncond calls untouched
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    assert torch.equal(_call(pipe, negative_prompt="blurry", true_cfg_scale=2.0), plain)


def test_pipeline_condition_image_matches_denoiser_reference(pipe):
    """Image-conditioned call: the NAG negative is encoded with the condition image (its own image_pad_mask); the
    first step's guided output equals the reference built from the pipeline's own encodings."""
    from nagkit.tiny.pipelines import tiny_condition_image

    image = tiny_condition_image(64, 64)
    seen = {}

    def grab(module, args, kwargs):
        if "out" not in seen:
            seen["kwargs"] = dict(kwargs)

    def grab_out(module, args, kwargs, output):
        seen.setdefault("out", output[0])

    model = pipe.transformer
    hooks = [model.register_forward_pre_hook(grab, with_kwargs=True),
             model.register_forward_hook(grab_out, with_kwargs=True)]
    try:
        with nagkit.apply(pipe, negative_prompt="a blurry dog", scale=SCALE, tau=TAU, alpha=ALPHA):
            out = _call(pipe, image=image, output_resolution=64, num_inference_steps=1)
            resized = pipe.image_processor.resize(image.convert("RGBA"), width=64, height=64)  # as the pipeline
            neg_embeds, neg_mask, neg_slots = pipe.encode_prompt("a blurry dog", image=[resized])
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(out).all()
    call = seen["kwargs"]
    assert call["img_mask"][0, : call["encoder_hidden_states"].shape[1]].any()  # condition slots in the prompt
    assert neg_slots.any()
    inputs = {k: call[k] for k in ("hidden_states", "encoder_hidden_states", "timestep", "img_shapes", "img_mask",
                                   "encoder_hidden_states_mask")}
    neg = {"encoder_hidden_states": neg_embeds, "img_mask": neg_slots}
    expected = reference(model, {**inputs, "return_dict": False}, neg)
    assert_close(seen["out"], expected[:, -seen["out"].shape[1]:])


def test_pipeline_per_sample_negatives_and_no_kv_cache(pipe, monkeypatch):
    """Two prompts with one negative each (padded prompts and negatives, per-row masks); without the KV cache the
    negative prefix pass runs at every guided step, with it once per generation."""
    import nagkit.adapters.qwenimage21 as q21

    calls = []
    original = q21.negative_prefix
    monkeypatch.setattr(q21, "negative_prefix", lambda *a: calls.append(1) or original(*a))
    prompts = ["a red cat", "a blue dog running in the snow"]
    with nagkit.apply(pipe, negative_prompt=["blurry", "dark night low quality"], scale=SCALE) as guide:
        cached = _call(pipe, prompt=prompts, num_inference_steps=3)
        assert len(calls) == 1 and guide.state.calls["guided"] == 3
        uncached = _call(pipe, prompt=prompts, num_inference_steps=3, use_kv_cache=False)
        assert len(calls) == 4
    assert cached.shape[0] == 2 and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)  # the cache changes nothing but rounding
