"""Qwen-Image (dual-stream joint attention, text mask, text RoPE after the image extent): nagkit vs a plain two-stream
reference, identities, rows, windows, removal; the key-only mask path of the joint kernel; the tiny pipelines
(text-to-image, img2img, inpaint, Edit, Edit Plus)."""

from __future__ import annotations

from math import prod

import pytest
import torch
from diffusers import (
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from PIL import Image

import nagkit
from nagkit.core.state import Packing
from nagkit.kernels.joint import nag_joint_attention
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .reference import reference_nag, swapped

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
LT = 7  # prompt tokens


# ------------------------------------------------------------------------------------------------ reference
@torch.no_grad()
def qwen_reference(model, inputs, negative, scale=SCALE, tau=TAU, alpha=ALPHA):
    """Qwen-Image with NAG written out plainly: one image stream, two text streams (prompt, negative), each block's
    joint attention run twice through the model's own processor (``[Tp, I]`` and ``[Tn, I]``, each text with its own
    mask and its own RoPE rows from ``pos_embed`` asked for its own length); the image takes NAG(Z+, Z-)."""
    img_shapes = inputs["img_shapes"]
    x = model.img_in(inputs["hidden_states"])
    t = inputs["timestep"].to(x.dtype)
    zero = model.zero_cond_t
    index = None
    if zero:  # edit models: condition images modulated at t = 0
        t = torch.cat([t, t * 0])
        index = torch.tensor([[0] * prod(s[0]) + [1] * sum(prod(q) for q in s[1:]) for s in img_shapes],
                             dtype=torch.int)
    temb = model.time_text_embed(t, x)
    temb_txt = temb.chunk(2)[0] if zero else temb
    streams = []
    for text, mask in ((inputs["encoder_hidden_states"], inputs.get("encoder_hidden_states_mask")),
                       (negative["encoder_hidden_states"], negative.get("encoder_hidden_states_mask"))):
        txt = model.txt_in(model.txt_norm(text))
        rope = model.pos_embed(img_shapes, max_txt_seq_len=txt.shape[1], device=x.device)
        streams.append([txt, None if mask is None else mask.bool(), rope])
    proc = QwenDoubleStreamAttnProcessor2_0()
    for blk in model.transformer_blocks:
        img_mod1, img_mod2 = blk.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = blk.txt_mod(temb_txt).chunk(2, dim=-1)
        img_in, img_gate1 = blk._modulate(blk.img_norm1(x), img_mod1, index)
        outs = []
        for txt, mask, rope in streams:
            txt_in, txt_gate1 = blk._modulate(blk.txt_norm1(txt), txt_mod1)
            with swapped(blk.attn.to_out, "0", torch.nn.Identity()):
                z, ctx = proc(blk.attn, img_in, txt_in, mask, None, rope)
            outs.append((z, ctx, txt_gate1))
        x = x + img_gate1 * blk.attn.to_out[0](reference_nag(outs[0][0], outs[1][0], scale, tau, alpha))
        img_in2, img_gate2 = blk._modulate(blk.img_norm2(x), img_mod2, index)
        x = x + img_gate2 * blk.img_mlp(img_in2)
        for stream, (_, ctx, gate1) in zip(streams, outs, strict=True):
            txt = stream[0] + gate1 * ctx
            txt_in2, txt_gate2 = blk._modulate(blk.txt_norm2(txt), txt_mod2)
            stream[0] = txt + txt_gate2 * blk.txt_mlp(txt_in2)
    return model.proj_out(model.norm_out(x, temb_txt))


def _model(zero_cond_t=False, layer3d=False):
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t,
                                       use_layer3d_rope=layer3d).eval()


def _inputs(edit=False, batch=2, prompt_mask=True, seed=1):
    """16 image tokens (4x4); ``edit``: 16 more condition tokens listed in ``img_shapes`` (an Edit call)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, 4), (1, 4, 4)] if edit else [(1, 4, 4)]
    inputs = dict(hidden_states=torch.randn(batch, sum(prod(s) for s in shapes), 16, generator=g),
                  encoder_hidden_states=torch.randn(batch, LT, 16, generator=g),
                  timestep=torch.full((batch,), 0.7), img_shapes=[shapes] * batch, return_dict=False)
    if prompt_mask:
        mask = torch.ones(batch, LT, dtype=torch.long)
        mask[0, LT - 2:] = 0  # row 0: a shorter prompt padded to the batch's length
        inputs["encoder_hidden_states_mask"] = mask
    return inputs


def _negative(ln, batch=2, masked=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    negative = {"encoder_hidden_states": torch.randn(batch, ln, 16, generator=g)}
    if masked:
        mask = torch.ones(batch, ln, dtype=torch.long)
        mask[batch - 1, ln - 1:] = 0
        negative["encoder_hidden_states_mask"] = mask
    return negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


@pytest.fixture(scope="module", params=["t2i", "edit", "layer3d"])
def qwen(request):
    """``edit``: condition latents in the image stream, ``zero_cond_t`` modulation (Qwen-Image-Edit-2511 style);
    ``layer3d``: the layered model's ``QwenEmbedLayer3DRope`` (bare denoiser here; its pipeline: test_variants_more)."""
    edit, layer3d = request.param == "edit", request.param == "layer3d"
    return _model(zero_cond_t=edit, layer3d=layer3d), edit or layer3d


# ------------------------------------------------------------------------------------------------ model level
@pytest.mark.parametrize("ln,prompt_mask,neg_mask", [(5, True, True), (9, False, True), (9, True, False),
                                                     (4, False, False)])
def test_matches_reference(qwen, ln, prompt_mask, neg_mask):
    """Batch 2, one negative per row, negatives shorter/longer than the prompt, with and without masks; the edit
    variant has condition latents in the image stream (and zero_cond_t modulation)."""
    model, edit = qwen
    inputs, negative = _inputs(edit, prompt_mask=prompt_mask), _negative(ln, masked=neg_mask)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
        assert guide.state.last_packing.ln == ln  # one row's padding only: kept
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, qwen_reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_reference_is_the_model_at_identity(qwen):
    model, edit = qwen
    inputs = _inputs(edit)
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_hidden_states_mask": inputs["encoder_hidden_states_mask"]}
    torch.testing.assert_close(qwen_reference(model, inputs, same), run(model, inputs), atol=1e-5, rtol=1e-5)


def test_negative_positions_follow_the_negative_alone():
    """The negative's text RoPE rows are those of a call with the negative as the prompt (max_vid_index + j), not
    max_vid_index + lp + j; packing with plain (unhooked) positions would differ."""
    model = _model()
    inputs, negative = _inputs(prompt_mask=False), _negative(5, masked=False)
    seen = []
    handle = model.pos_embed.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
            run(model, inputs)
    finally:
        handle.remove()
    vid, txt = seen[-1]
    _, rows_p = model.pos_embed(inputs["img_shapes"], max_txt_seq_len=LT, device="cpu")
    _, rows_n = model.pos_embed(inputs["img_shapes"], max_txt_seq_len=5, device="cpu")
    assert torch.equal(txt, torch.cat([rows_p, rows_n]))
    _, packed = model.pos_embed(inputs["img_shapes"], max_txt_seq_len=LT + 5, device="cpu")
    assert not torch.equal(txt, packed)


def test_padding_of_the_negative_is_dropped_exactly():
    """Tokens every row masks are dropped before packing; the result equals the unpadded negative's."""
    model = _model()
    inputs, negative = _inputs(), _negative(5)
    padded = {"encoder_hidden_states": torch.cat([negative["encoder_hidden_states"], torch.randn(2, 3, 16)], 1),
              "encoder_hidden_states_mask": torch.cat([negative["encoder_hidden_states_mask"],
                                                       torch.zeros(2, 3, dtype=torch.long)], 1)}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        short = run(model, inputs)
    with nagkit.apply(model, negative=padded, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        long = run(model, inputs)
        assert guide.state.last_packing.ln == 5
    torch.testing.assert_close(long, short, atol=1e-6, rtol=1e-6)


def test_identities_rows_window_and_removal(qwen):
    model, edit = qwen
    inputs, negative = _inputs(edit), _negative(5)
    base = run(model, inputs)
    procs = dict(model.attn_processors)
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "encoder_hidden_states_mask": inputs["encoder_hidden_states_mask"]}
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        guide.update(scale=1.0)
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)

    guide = nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA)
    guided = run(model, inputs)
    # batched CFG on a bare denoiser: [uncond, cond] rows, the conditional half guided, the other as plain
    cfg = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in inputs.items()}
    cfg["img_shapes"] = inputs["img_shapes"] * 2
    both = run(model, cfg)
    assert guide.state.last_packing.rows == slice(2, 4)
    torch.testing.assert_close(both[2:], guided, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:2], base, atol=1e-5, rtol=1e-5)
    # a call named "uncond" (the pipelines' true CFG) is never guided: bit-identical
    with model.cache_context("uncond"):
        assert torch.equal(run(model, inputs), base)
    # window: the pipelines pass t / 1000, so t = 0.7 sits at u = 0.3
    guide.update(start=0.4)
    assert torch.equal(run(model, inputs), base)
    guide.update(start=0.0, end=0.25)
    assert torch.equal(run(model, inputs), base)
    guide.update(end=0.35)
    assert torch.equal(run(model, inputs), guided)
    assert "forward" in model.pos_embed.__dict__  # the text-RoPE hook
    guide.remove()
    assert all(model.attn_processors[k] is v for k, v in procs.items())
    assert "forward" not in model.__dict__ and "forward" not in model.pos_embed.__dict__
    assert not hasattr(model, "_nagkit_guide")
    assert torch.equal(run(model, inputs), base)


def test_per_sample_negatives_equal_single_rows():
    model = _model()
    inputs, negative = _inputs(), _negative(5)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        both = run(model, inputs)
    for i in range(2):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in inputs.items()}
        one["img_shapes"] = inputs["img_shapes"][:1]
        with nagkit.apply(model, negative={k: v[i:i + 1] for k, v in negative.items()}, scale=SCALE, tau=TAU,
                          alpha=ALPHA):
            torch.testing.assert_close(run(model, one), both[i:i + 1], atol=1e-5, rtol=1e-5)


def test_unsupported_variants_are_refused():
    model = _model()
    negative = _negative(5)
    with pytest.raises(ValueError, match="mode='official' is not available for QwenImageTransformer2DModel"):
        nagkit.apply(model, negative=negative, mode="official")

    class OtherProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            raise AssertionError("not reached")

    original = model.transformer_blocks[1].attn.processor
    model.transformer_blocks[1].attn.set_processor(OtherProcessor())
    try:
        with pytest.raises(NotImplementedError, match="OtherProcessor.*QwenDoubleStreamAttnProcessor2_0"):
            nagkit.apply(model, negative=negative)
    finally:
        model.transformer_blocks[1].attn.set_processor(original)


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("rows", [slice(0, 2), slice(1, 2)])
def test_key_only_mask_in_the_joint_kernel(rows):
    """A (B, 1, 1, L) key mask gives what its square (B, 1, L, L) expansion gives, with log-sum-exp merges or two
    full attentions; a row whose negative text is fully masked gets Z- from the image keys alone."""
    g = torch.Generator().manual_seed(0)
    b, h, d, lp, ln, li = 2, 2, 8, 5, 4, 12
    total = lp + ln + li
    q, k, v = (torch.randn(b, h, total, d, generator=g) for _ in range(3))
    keep = torch.ones(b, total, dtype=torch.bool)
    keep[0, 3:lp] = False
    keep[1, lp:lp + ln] = False  # row 1: every negative text key masked
    key_mask = keep[:, None, None, :]
    packing = Packing(lp=lp, ln=ln, rows=rows, batch=b)
    kwargs = dict(text_first=True, scale=SCALE, tau=TAU, alpha=ALPHA)
    out = nag_joint_attention(q, k, v, packing, bias=key_mask, **kwargs)
    square = nag_joint_attention(q, k, v, packing, bias=key_mask.expand(b, 1, total, total), **kwargs)
    two = nag_joint_attention(q, k, v, packing, bias=key_mask, use_lse=False, **kwargs)
    additive = torch.zeros(key_mask.shape).masked_fill(~key_mask, float("-inf"))
    torch.testing.assert_close(out, square, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nag_joint_attention(q, k, v, packing, bias=additive, **kwargs), out, atol=1e-6,
                               rtol=1e-6)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ pipelines
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=2, name="tiny-qwen-image", **kwargs):
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type="latent", true_cfg_scale=1.0)
    call.update(kwargs)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, generator=generator, **call)[0]


@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES["tiny-qwen-image"](seed=0)


def test_pipeline_guides_identities_and_removal(pipe):
    base = generate(pipe)
    procs = dict(pipe.transformer.attn_processors)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE)
    assert guide.config == nagkit.PRESETS["qwen-image"]
    guided = generate(pipe)
    assert guide.state.calls == {"guided": 2, "unguided": 0}
    assert (guided - base).abs().max() > 1e-4
    image = pipe(PROMPT, num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **TINY_CALL_KWARGS["tiny-qwen-image"]).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    guide.update(scale=1.0)
    assert torch.equal(generate(pipe), base)
    guide.update(scale=5.0, negative_prompt=PROMPT)
    torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=1e-5)
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_nagkit_guide")
    assert all(pipe.transformer.attn_processors[k] is v for k, v in procs.items())
    assert "forward" not in pipe.transformer.__dict__ and "forward" not in pipe.transformer.pos_embed.__dict__
    assert torch.equal(generate(pipe), base)


def test_pipeline_true_cfg_guides_only_the_conditional_call(pipe):
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))
    try:
        base_final = generate(pipe, true_cfg_scale=3.0, negative_prompt="ugly")
        base = list(outputs)
        outputs.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
            final = generate(pipe, true_cfg_scale=3.0, negative_prompt="ugly")
            calls = dict(guide.state.calls)
            # default NAG negative: the call's CFG negative
            guide.update(negative_prompt="ugly")
            explicit = generate(pipe, true_cfg_scale=3.0, negative_prompt="ugly")
    finally:
        handle.remove()
    assert calls == {"guided": 2, "unguided": 2}
    assert torch.equal(outputs[1], base[1])  # the first step's "uncond" call (later ones see guided latents)
    assert (outputs[0] - base[0]).abs().max() > 1e-4 and (final - base_final).abs().max() > 1e-4
    with nagkit.apply(pipe, scale=5.0, alpha=0.5):
        default = generate(pipe, true_cfg_scale=3.0, negative_prompt="ugly")
    assert torch.equal(default, explicit)


def test_pipeline_batch_per_sample_negatives_and_embeddings(pipe):
    """Prompts of unequal length (the pipeline then passes a text mask) with one negative each equal single runs; a
    negative in the pipeline's embedding form equals the same negative as text."""
    prompts = ["a red cat sitting on a table", "a dog"]
    negatives = ["blurry low quality", "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5) as guide:
        batch = generate(pipe, prompt=prompts, seeds=(0, 1))
        assert guide.state.last_packing.batch == 2
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(pipe, prompt=prompts[i], seeds=(i,))
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)
    embeds, mask = pipe.encode_prompt("dark night", device="cpu")
    with nagkit.apply(pipe, negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask, scale=5.0):
        from_embeds = generate(pipe)
    with nagkit.apply(pipe, negative_prompt="dark night", scale=5.0):
        from_text = generate(pipe)
    torch.testing.assert_close(from_embeds, from_text, atol=1e-6, rtol=1e-6)


def test_pipeline_window(pipe):
    base = generate(pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=0.0, end=1.0) as guide:
        everywhere = generate(pipe)
        first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]
        guide.update(end=(first + second) / 2)  # the first step only
        guide.state.calls.update(guided=0, unguided=0)
        first_only = generate(pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 1}
    assert not torch.equal(first_only, base) and not torch.equal(first_only, everywhere)


@pytest.mark.parametrize("klass", [QwenImageImg2ImgPipeline, QwenImageInpaintPipeline])
def test_img2img_and_inpaint(pipe, klass):
    other = klass(**pipe.components)
    other.set_progress_bar_config(disable=True)
    extra = {"image": tiny_condition_image(64, 64), "strength": 0.75, "steps": 3}
    if klass is QwenImageInpaintPipeline:
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        extra["mask_image"] = mask
    base = generate(other, **extra)
    with nagkit.apply(other, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = generate(other, **extra)
        assert guide.state.calls == {"guided": 3, "unguided": 0}  # strength 0.75 of 3 steps: 3 steps here
        guide.update(scale=1.0)
        assert torch.equal(generate(other, **extra), base)
    assert (guided - base).abs().max() > 1e-4


def test_edit_pipelines_encode_the_negative_with_the_condition_image(monkeypatch):
    """Edit: the NAG negative goes through encode_prompt with the call's condition image (like the CFG negative);
    the condition latents ride in the image stream. Edit Plus (same components) is guided too.

    The edit pipelines always VAE-encode the condition at about 1 megapixel (seconds on a busy CPU, 4096 tokens);
    here their size rule targets 64x64 instead (16 condition tokens), which changes nothing NAG sees but the count.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    size = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: size(64 * 64, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    edit = TINY_PIPELINES["tiny-qwen-image-edit"](seed=0)
    seen = []
    original = edit.encode_prompt

    def spy(*args, **kwargs):
        seen.append((kwargs.get("prompt"), kwargs.get("image")))
        return original(*args, **kwargs)

    edit.encode_prompt = spy
    image = tiny_condition_image(64, 64)
    kwargs = {"name": "tiny-qwen-image-edit", "image": image}
    base = generate(edit, **kwargs)
    seen.clear()
    shapes = []
    handle = edit.transformer.register_forward_pre_hook(
        lambda m, a, kw: shapes.append((kw["hidden_states"].shape[1], kw["img_shapes"])), with_kwargs=True)
    with nagkit.apply(edit, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = generate(edit, **kwargs)
        packing = guide.state.last_packing
        handle.remove()
        guide.update(scale=1.0)
        assert torch.equal(generate(edit, **kwargs), base)
    assert (guided - base).abs().max() > 1e-4
    assert shapes[0] == (32, [[(1, 4, 4), (1, 4, 4)]])  # 16 target + 16 condition tokens: one image stream
    prompt_call, negative_call = seen[0], seen[1]
    assert prompt_call[0] == PROMPT and negative_call[0] == [NEGATIVE]
    assert negative_call[1] is prompt_call[1] and negative_call[1] is not None  # same condition image
    # the negative's text holds the condition image's vision tokens too: longer than the bare words
    assert packing.ln > len(edit.tokenizer(NEGATIVE).input_ids)
    del edit.encode_prompt

    plus = QwenImageEditPlusPipeline(**edit.components)
    plus.set_progress_bar_config(disable=True)
    base = generate(plus, **kwargs)
    with nagkit.apply(plus, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = generate(plus, **kwargs)
        assert guide.state.calls["guided"] == 2
    assert (guided - base).abs().max() > 1e-4
