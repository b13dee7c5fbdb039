"""HunyuanVideo 1.5 (side-car negative context): nagkit vs a doubled-batch reference, the side-car pinned to a
negative-alone forward, identities, window, rows, guider contexts, removal and refusals — at the denoiser level.

The reference (:func:`reference`) is the straightforward doubled computation, independent of nagkit's hooks and
kernels: the *unmodified* model runs on a batch of ``[prompt rows; negative rows]`` (texts padded to common lengths
with masked tokens, which the refiner's masks and the compaction ignore). So each negative row is, up to the blocks,
exactly a forward on the negative alone (refiner with its own mask, ByT5 projection, image tokens, compaction). In
every dual block the model's own ``HunyuanVideo15AttnProcessor2_0`` runs two full joint attentions, one per row, with
its query×key masks; :class:`DoubledRef` then replaces the video part of *both* rows' output (before the output
projection) by ``NAG(Z+, Z-)`` with the literal paper formula, so the two rows keep one video stream while their
contexts evolve separately. The model output is the prompt rows.

No tiny pipeline: see the adapter module (the tests stay at the denoiser level).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nagkit
from nagkit.adapters.hunyuanvideo15 import SIDE_CAR, tiny_hunyuanvideo15_transformer

from .mmdit_reference import joint_processors
from .reference import reference_nag, swapped

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
VIDEO = 32  # 2 x 4 x 4 latents, patch 1


def _dual(name, module):
    return name.startswith("transformer_blocks.") and name.endswith(".attn")


class DoubledRef:
    """The model's own processor on ``[prompt rows; negative rows]``; video outputs of both rows := NAG(Z+, Z-)."""

    def __init__(self, inner, batch, rows=None):
        self.inner, self.batch = inner, batch
        self.rows = range(batch) if rows is None else rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            z, ctx = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        z = z.clone()
        b = self.batch
        for i in self.rows:
            guided = reference_nag(z[i], z[b + i], SCALE, TAU, ALPHA)
            z[i], z[b + i] = guided, guided
        return attn.to_out[0](z), ctx


def _pad(x, length):
    return F.pad(x, (0, 0, 0, length - x.shape[1])) if x.ndim == 3 else F.pad(x, (0, length - x.shape[1]))


def _cat_padded(a, b):
    length = max(a.shape[1], b.shape[1])
    return torch.cat([_pad(a, length), _pad(b, length)])


@torch.no_grad()
def reference(model, inputs, negative):
    b = inputs["encoder_hidden_states"].shape[0]
    big = {**inputs,
           "hidden_states": torch.cat([inputs["hidden_states"]] * 2),
           "timestep": torch.cat([inputs["timestep"]] * 2),
           "image_embeds": torch.cat([inputs["image_embeds"]] * 2)}
    for key in ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                "encoder_attention_mask_2"):
        big[key] = _cat_padded(inputs[key], negative[key])
    with joint_processors(model, lambda inner: DoubledRef(inner, b), _dual):
        return model(**big)[0][:b]


@pytest.fixture(scope="module")
def hv():
    model = tiny_hunyuanvideo15_transformer(seed=0)
    g = torch.Generator().manual_seed(1)
    b = 2
    mask = torch.ones(b, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask_2 = torch.zeros(b, 4, dtype=torch.long)
    mask_2[0, :2] = 1  # row 1: no glyph text (all masked, as the pipeline encodes a prompt without quotes)
    inputs = dict(hidden_states=torch.randn(b, 4, 2, 4, 4, generator=g), timestep=torch.tensor([300.0, 300.0]),
                  encoder_hidden_states=torch.randn(b, 7, 16, generator=g), encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(b, 4, 8, generator=g), encoder_attention_mask_2=mask_2,
                  image_embeds=torch.zeros(b, 3, 8), return_dict=False)
    neg_mask = torch.ones(b, 9, dtype=torch.long)
    neg_mask[1, 3:] = 0
    neg_mask_2 = torch.zeros(b, 3, dtype=torch.long)
    neg_mask_2[1, :] = 1
    negative = {"encoder_hidden_states": torch.randn(b, 9, 16, generator=g), "encoder_attention_mask": neg_mask,
                "encoder_hidden_states_2": torch.randn(b, 3, 8, generator=g), "encoder_attention_mask_2": neg_mask_2}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def _row(inputs, i):
    return {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}


def test_matches_reference_t2v_with_masks_and_per_row_lengths(hv):
    model, inputs, negative = hv
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls == {"guided": 1, "unguided": 0}
        packing = guide.state.last_packing
    assert (packing.ln, packing.rows) == (9, slice(0, 2))  # the negative trimmed to its longest valid row (9 + 0)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, negative), atol=1e-5, rtol=1e-5)
    # per-sample negatives: each row equals its own single-row run
    for i in range(2):
        with nagkit.apply(model, negative={k: v[i:i + 1] for k, v in negative.items()}, scale=SCALE, tau=TAU,
                          alpha=ALPHA):
            torch.testing.assert_close(run(model, _row(inputs, i)), out[i:i + 1], atol=1e-5, rtol=1e-5)


def test_matches_reference_i2v_image_tokens_never_negated(hv):
    """Image-to-video: the conditioning image tokens are valid context in both the prompt's and the negative's
    context (the same image: it is never negated)."""
    model, inputs, negative = hv
    g = torch.Generator().manual_seed(4)
    i2v = {**inputs, "image_embeds": torch.randn(2, 3, 8, generator=g)}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, i2v)
        assert guide.state.last_packing.ln == 3 + 9
    torch.testing.assert_close(out, reference(model, i2v, negative), atol=1e-5, rtol=1e-5)


def test_side_car_matches_a_forward_on_the_negative_alone(hv):
    """Pins the layout code replicated from the model's forward: the negative context entering the first block equals
    the model's own block-0 context when it runs on the negative alone (valid tokens first)."""
    model, inputs, negative = hv
    for image_embeds in (inputs["image_embeds"], torch.randn(2, 3, 8)):
        alone = {**inputs, **negative, "image_embeds": image_embeds}
        seen = {}

        def grab(module, args, seen=seen):
            seen.setdefault("a", args)

        handle = model.transformer_blocks[0].register_forward_pre_hook(grab)
        try:
            run(model, alone)
        finally:
            handle.remove()
        _, context, _, mask, _ = seen["a"]
        with nagkit.apply(model, negative=negative, scale=SCALE) as guide:
            def side_car(module, args, seen=seen, guide=guide):
                side = guide.state.extras[SIDE_CAR]
                seen.setdefault("side", (side.stream.clone(), side.mask.clone()))

            handle = model.transformer_blocks[0].register_forward_pre_hook(side_car)
            try:
                run(model, {**inputs, "image_embeds": image_embeds})
            finally:
                handle.remove()
        stream, keep = seen.pop("side")
        for i in range(2):
            n = int(mask[i].sum())
            assert bool(mask[i, :n].all()) and int(keep[i].sum()) == n and bool(keep[i, :n].all())
            torch.testing.assert_close(stream[i, :n], context[i, :n], atol=1e-6, rtol=1e-6)


def test_identities(hv):
    model, inputs, negative = hv
    base = run(model, inputs)
    with nagkit.apply(model, negative=negative, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        same = {k: inputs[k] for k in negative}
        guide.update(negative=same, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1


def test_window(hv):
    model, inputs, negative = hv
    base = run(model, inputs)  # timestep 300: u = 0.7
    with nagkit.apply(model, negative=negative, scale=SCALE, start=0.8, end=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(start=0.0, end=0.6)
        assert torch.equal(run(model, inputs), base)
        guide.update(start=0.6, end=0.8)
        assert not torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 1, "unguided": 2}


def test_batched_cfg_rows_broadcast_negative_and_guider_contexts(hv):
    """A bare denoiser called with ``[uncond; cond]`` rows guides the conditional half only; a one-row negative guides
    every row like the same negative per row; the guider's ``pred_uncond`` call is never guided (bit-identical),
    its ``pred_cond`` call is; a negative without ByT5 fields is an empty (all-masked) glyph text."""
    model, inputs, negative = hv
    g = torch.Generator().manual_seed(3)
    uncond = {**inputs, "encoder_hidden_states": torch.randn(inputs["encoder_hidden_states"].shape, generator=g)}
    cfg = {k: torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}
    plain_uncond = run(model, uncond)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        both = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
        guided = run(model, inputs)
        with model.cache_context("pred_cond"):
            assert torch.equal(run(model, inputs), guided)
    torch.testing.assert_close(both[:2], plain_uncond, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[2:], guided, atol=1e-5, rtol=1e-5)
    with nagkit.apply(model, negative=negative, scale=SCALE) as guide:
        with model.cache_context("pred_uncond"):
            assert torch.equal(run(model, uncond), plain_uncond)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
    one = {k: v[1:] for k, v in negative.items()}
    tiled = {k: torch.cat([v, v]) for k, v in one.items()}
    with nagkit.apply(model, negative=one, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        a = run(model, inputs)
        assert guide.state.last_packing.rows == slice(0, 2)
    with nagkit.apply(model, negative=tiled, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), a, atol=1e-6, rtol=1e-6)
    text_only = {k: negative[k] for k in ("encoder_hidden_states", "encoder_attention_mask")}
    empty = {**text_only, "encoder_hidden_states_2": torch.randn(2, 3, 8),
             "encoder_attention_mask_2": torch.zeros(2, 3, dtype=torch.long)}
    with nagkit.apply(model, negative=text_only, scale=SCALE, tau=TAU, alpha=ALPHA):
        b = run(model, inputs)
    torch.testing.assert_close(b, reference(model, inputs, empty), atol=1e-5, rtol=1e-5)


def test_two_attentions_way_matches(hv):
    """The official-style way (two full joint attentions per block) gives the same result as the LSE merge."""
    from nagkit.kernels.joint import force_two_attentions

    model, inputs, negative = hv
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        fast = run(model, inputs)
        with force_two_attentions():
            two = run(model, inputs)
    torch.testing.assert_close(two, fast, atol=1e-5, rtol=1e-5)


def test_remove_restores_exactly_and_refusals(hv):
    model, inputs, negative = hv
    base = run(model, inputs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    seen = {}
    handle = model.transformer_blocks[1].attn.register_forward_pre_hook(
        lambda m, a: seen.setdefault("p", m.processor) and None)
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn.register_forward_pre_hook(
        lambda m, a: seen.setdefault("r", m.processor) and None)
    run(model, inputs)
    handle.remove()
    refiner.remove()
    assert isinstance(seen["p"], nagkit.adapters.NAGProcessor)
    assert seen["p"].inner is before["transformer_blocks.1.attn"]
    assert seen["r"] is before["context_embedder.token_refiner.refiner_blocks.0.attn"]  # the refiner: never guided
    guide.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(before[n] is after[n] for n in before)
    assert "forward" not in model.transformer_blocks[0].__dict__ and "forward" not in model.__dict__
    assert torch.equal(run(model, inputs), base)

    with pytest.raises(ValueError, match="mode='official' is not available for HunyuanVideo15Transformer3DModel"):
        nagkit.apply(model, negative=negative, mode="official")
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = model.transformer_blocks[0].attn.processor
    model.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(NotImplementedError, match="AttnProcessor2_0"):
            nagkit.apply(model, negative=negative)
    finally:
        model.transformer_blocks[0].attn.set_processor(original)
    with nagkit.apply(model, negative={"encoder_hidden_states": torch.zeros(1, 3, 8)}):
        with pytest.raises(ValueError, match="negative embeddings have 8 channels, the prompt's have 16"):
            run(model, inputs)
    assert torch.equal(run(model, inputs), base)


def test_pipeline_specs_reset_the_prompt_only_arguments():
    """Both pipelines are registered; the negative is encoded with ``prompt_embeds_2`` and both masks reset and read
    back as (embeds, mask, ByT5 embeds, ByT5 mask)."""
    from nagkit.adapters.base import PIPELINES
    from nagkit.integration.pipelines import negative_arguments

    for name in ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"):
        spec = PIPELINES[name]
        assert (spec.embeds_index, spec.mask_index, spec.extras) == (
            0, 1, {"encoder_hidden_states_2": 2, "encoder_attention_mask_2": 3})
        args = negative_arguments({"prompt": "p", "batch_size": 1, "num_videos_per_prompt": 2,
                                   "prompt_embeds": torch.zeros(1), "prompt_embeds_mask": torch.zeros(1),
                                   "prompt_embeds_2": torch.zeros(1), "prompt_embeds_mask_2": torch.zeros(1)},
                                  ["n"], spec)
        assert args == {"prompt": ["n"], "batch_size": 1, "num_videos_per_prompt": 2, "prompt_embeds": None,
                        "prompt_embeds_mask": None, "prompt_embeds_2": None, "prompt_embeds_mask_2": None}


def test_meta_bench_counts_equal_a_cpu_run():
    """``nagkit bench`` counts the model on the meta device through :func:`bench_model` (marked masks answer the
    forward's data-dependent compaction): plain and guided FLOPs equal a CPU run with real masks of the same pattern
    (prompt: 5 of 7 Qwen tokens valid, no glyph text, zero image tokens; negative: 4 valid Qwen tokens)."""
    from nagkit.adapters.hunyuanvideo15 import _mark, bench_model
    from nagkit.bench.flops import count_flops

    cpu = tiny_hunyuanvideo15_transformer(seed=0)
    meta = bench_model(tiny_hunyuanvideo15_transformer(seed=0).to("meta"))

    def inputs(device):
        def make(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        mask, mask_2, n_mask, n_mask_2 = (make(1, n, dtype=torch.long) for n in (7, 4, 4, 3))
        if device == "meta":
            _mark(mask, 5), _mark(mask_2, 0), _mark(n_mask, 4), _mark(n_mask_2, 0)
        else:
            mask[:, :5] = 1
            n_mask[:] = 1
        kwargs = dict(hidden_states=make(1, 4, 2, 4, 4), timestep=make(1), encoder_hidden_states=make(1, 7, 16),
                      encoder_attention_mask=mask, encoder_hidden_states_2=make(1, 4, 8),
                      encoder_attention_mask_2=mask_2, image_embeds=make(1, 3, 8), return_dict=False)
        negative = {"encoder_hidden_states": make(1, 4, 16), "encoder_attention_mask": n_mask,
                    "encoder_hidden_states_2": make(1, 3, 8), "encoder_attention_mask_2": n_mask_2}
        return kwargs, negative

    counts = {}
    for name, model in (("cpu", cpu), ("meta", meta)):
        kwargs, negative = inputs(name)
        plain = count_flops(lambda model=model, kwargs=kwargs: model(**kwargs))
        with nagkit.apply(model, negative=negative, scale=SCALE) as guide:
            guided = count_flops(lambda model=model, kwargs=kwargs: model(**kwargs))
            assert guide.state.calls["guided"] == 1 and guide.state.last_packing.ln == 4
        counts[name] = (plain, guided)
    assert counts["meta"] == counts["cpu"] and counts["cpu"][1] > counts["cpu"][0]


# ------------------------------------------------------------------------------------------------ the tiny pipeline
PROMPT, NEGATIVE = 'a red cat holding a sign "HELLO" on a table', "blurry low quality"
CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    from nagkit.adapters.hunyuanvideo15 import tiny_hunyuanvideo15_pipeline

    return tiny_hunyuanvideo15_pipeline(seed=0)


def _generate(pipe, record=None, **kwargs):
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        frames = pipe(prompt=PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(0),
                      **{**CALL, **kwargs}).frames
    finally:
        handle.remove()
    if record is not None:
        record.extend(outputs)
    return frames


def test_pipeline_guides_the_cond_call_only_identities_and_removal(pipe):
    """Through ``HunyuanVideo15Pipeline`` and its CFG guider: the ``pred_cond`` calls are guided, the
    ``pred_uncond`` calls never (bit-identical at the first step, where both runs have the same latents); the negative
    comes from ``encode_prompt`` with its own ByT5 fields; scale 1 is the plain pipeline; removal restores it."""
    plain_calls = []
    base = _generate(pipe, plain_calls)
    seen = {}
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        handle = pipe.transformer.register_forward_pre_hook(
            lambda m, a: seen.setdefault("negative", guide.state.negative) and None)
        calls = []
        try:
            out = _generate(pipe, calls)
        finally:
            handle.remove()
        assert guide.state.calls == {"guided": 2, "unguided": 2}
        guide.update(scale=1.0)
        assert torch.equal(_generate(pipe), base)
    assert (out - base).abs().max() > 1e-4
    assert torch.equal(calls[1], plain_calls[1])  # first step, pred_uncond: untouched
    assert not torch.equal(calls[0], plain_calls[0])  # first step, pred_cond: guided
    negative = seen["negative"]
    assert set(negative.extras) == {"encoder_hidden_states_2", "encoder_attention_mask_2"}
    assert negative.mask.sum() > 0 and negative.extras["encoder_attention_mask_2"].sum() == 0  # no quoted text
    assert "encode_prompt" not in pipe.__dict__ and torch.equal(_generate(pipe), base)
