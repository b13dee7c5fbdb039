"""Lumina 2 (side-car negative stream): nagkit vs a doubled-batch reference, the side-car pinned to a negative-alone
forward, identities, windows, rows, removal, proportional attention, errors, and the tiny pipeline.

The reference (:func:`reference`) is the straightforward doubled computation, independent of nagkit's hooks and
kernels: the *unmodified* model runs on a batch of ``[prompt rows; negative rows]`` (text padded to a common length
with masked tokens). So each negative row is, up to the main layers, exactly a forward on the negative alone (the
model's own caption embedder, context refiner with the negative's mask and positions ``(j, 0, 0)``, compaction, image
at ``(L_eff,n, row, col)``, batch-padding mask). In every main layer the model's own ``Lumina2AttnProcessor2_0`` runs
two full joint attentions, one per row; :class:`DoubledLumina2Ref` then replaces the image part of *both* rows' output
(before the output projection) by ``NAG(Z+, Z-)`` with the literal paper formula, so the two rows keep one image
stream while their caption tokens evolve separately. The model output is the prompt rows. Image positions differ
between the rows (``L_eff,p`` vs ``L_eff,n``) but RoPE is relative, so the image→image and image→negative scores are
those nagkit computes with the negative shifted by ``d = L_eff,p − L_eff,n``; the results agree to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nagkit
from nagkit.adapters.lumina2 import SIDE_CAR, TINY_CALL, rope_rows, tiny_lumina2_transformer
from nagkit.tiny.pipelines import TINY_PIPELINES

from .mmdit_reference import joint_processors
from .reference import reference_nag, swapped

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
IMAGE = 16  # 8x8 latents, patch 2


def _main(name, module):
    return name.startswith("layers.") and name.endswith(".attn")


class DoubledLumina2Ref:
    """The model's own processor on ``[prompt rows; negative rows]``; image outputs of both rows := NAG(Z+, Z-)."""

    def __init__(self, inner, lp, ln, image, rows=None):
        self.inner, self.lp, self.ln, self.image = inner, lp, ln, image
        self.rows = range(len(lp)) if rows is None else rows

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            z = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                           base_sequence_length).clone()
        b = len(self.lp)
        for i in self.rows:
            p, n = slice(self.lp[i], self.lp[i] + self.image), slice(self.ln[i], self.ln[i] + self.image)
            guided = reference_nag(z[i, p], z[b + i, n], SCALE, TAU, ALPHA)
            z[i, p], z[b + i, n] = guided, guided
        return attn.to_out[0](z)


def _pad(x, length):
    return F.pad(x, (0, 0, 0, length - x.shape[1])) if x.ndim == 3 else F.pad(x, (0, length - x.shape[1]))


@torch.no_grad()
def reference(model, inputs, negative, hooks=()):
    """NAG the doubled way (see the module docstring); ``hooks`` are forward pre-hooks kept on during the run."""
    text, mask = inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    neg, neg_mask = negative["encoder_hidden_states"], negative["encoder_attention_mask"]
    length = max(text.shape[1], neg.shape[1])
    big = {**inputs, "hidden_states": torch.cat([inputs["hidden_states"]] * 2),
           "timestep": torch.cat([inputs["timestep"]] * 2),
           "encoder_hidden_states": torch.cat([_pad(text, length), _pad(neg, length)]),
           "encoder_attention_mask": torch.cat([_pad(mask, length), _pad(neg_mask, length)])}
    lp, ln = mask.sum(1).tolist(), neg_mask.sum(1).tolist()
    with joint_processors(model, lambda inner: DoubledLumina2Ref(inner, lp, ln, IMAGE), _main):
        return model(**big)[0][: text.shape[0]]


@pytest.fixture(scope="module")
def lumina():
    model = tiny_lumina2_transformer(seed=0)
    g = torch.Generator().manual_seed(1)
    b, lt = 2, 9
    mask = torch.ones(b, lt, dtype=torch.long)
    mask[0, 6:] = 0  # rows of different caption lengths: batch padding in the main layers
    inputs = dict(hidden_states=torch.randn(b, 16, 8, 8, generator=g), timestep=torch.tensor([0.3, 0.3]),
                  encoder_hidden_states=torch.randn(b, lt, 16, generator=g), encoder_attention_mask=mask,
                  return_dict=False)
    neg_mask = torch.ones(b, 11, dtype=torch.long)
    neg_mask[0, 10:] = 0  # row 0: 10 tokens > 6 (d < 0: positions below the RoPE table's start)
    neg_mask[1, 4:] = 0  # row 1: 4 tokens < 9 (d > 0)
    negative = {"encoder_hidden_states": torch.randn(b, 11, 16, generator=g), "encoder_attention_mask": neg_mask}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def _row(inputs, i):
    return {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}


def test_matches_reference_with_masks_and_per_row_lengths(lumina):
    model, inputs, negative = lumina
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls == {"guided": 1, "unguided": 0}
        packing = guide.state.last_packing
    assert (packing.lp, packing.ln, packing.rows) == (9, 10, slice(0, 2))  # negative trimmed to its valid tokens
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, negative), atol=1e-5, rtol=1e-5)
    # per-sample negatives: each row equals its own single-row run (no padding there at all)
    for i in range(2):
        with nagkit.apply(model, negative={k: v[i:i + 1] for k, v in negative.items()}, scale=SCALE, tau=TAU,
                          alpha=ALPHA):
            torch.testing.assert_close(run(model, _row(inputs, i)), out[i:i + 1], atol=1e-5, rtol=1e-5)


def test_negative_of_equal_valid_length_and_no_mask(lumina):
    """Uniform lengths (no padding anywhere: the fast layout path) and a negative given without a mask."""
    model, inputs, _ = lumina
    one = _row(inputs, 1)
    g = torch.Generator().manual_seed(5)
    neg = {"encoder_hidden_states": torch.randn(1, 9, 16, generator=g)}
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, one)
    full = {**neg, "encoder_attention_mask": torch.ones(1, 9, dtype=torch.long)}
    torch.testing.assert_close(out, reference(model, one, full), atol=1e-5, rtol=1e-5)


def _entry(side):
    """The side-car as it enters the first main layer (the layers replace its stream)."""
    from types import SimpleNamespace

    return SimpleNamespace(stream=side.stream.clone(), rope_n=side.rope_n.clone())


def test_side_car_matches_a_forward_on_the_negative_alone(lumina):
    """Pins the version-fragile layout code: the negative stream entering the first main layer equals the model's own
    block-0 caption input when it runs on the negative alone; its RoPE rows keep the negative-alone offsets to the
    image (d != 0 on both rows, one of them below the table's start), and d = 0 is bit-equal to the model's table."""
    model, inputs, negative = lumina
    alone = {**inputs, "encoder_hidden_states": negative["encoder_hidden_states"],
             "encoder_attention_mask": negative["encoder_attention_mask"]}
    seen = {}

    def grab(module, args):
        seen.setdefault("args", args)

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        run(model, alone)
        neg_hidden, _, neg_rope, _ = seen.pop("args")
        run(model, inputs)
        _, _, prompt_rope, _ = seen.pop("args")
        with nagkit.apply(model, negative=negative, scale=SCALE) as guide:
            handle.remove()
            handle = model.layers[0].register_forward_pre_hook(
                lambda m, a: seen.setdefault("side", _entry(guide.state.extras[SIDE_CAR])) and None)
            run(model, inputs)
    finally:
        handle.remove()
    side = seen["side"]
    lp = inputs["encoder_attention_mask"].sum(1).tolist()
    ln = negative["encoder_attention_mask"].sum(1).tolist()
    for i in range(2):
        torch.testing.assert_close(side.stream[i, :ln[i]], neg_hidden[i, :ln[i]], atol=1e-6, rtol=1e-6)
        # relative rotation negative caption j -> image token k: as in the negative-alone run
        ours = side.rope_n[i, :ln[i], None] * prompt_rope[i, None, lp[i]:lp[i] + IMAGE].conj()
        alone_rel = neg_rope[i, :ln[i], None] * neg_rope[i, None, ln[i]:ln[i] + IMAGE].conj()
        torch.testing.assert_close(ours, alone_rel, atol=1e-12, rtol=0)
    assert lp[0] - ln[0] < 0 < lp[1] - ln[1]
    table = rope_rows(model.rope_embedder, torch.arange(12))
    assert torch.equal(table, model.rope_embedder._get_freqs_cis(
        torch.stack([torch.arange(12), torch.zeros(12), torch.zeros(12)], -1)[None].int())[0])
    assert torch.equal(table[:ln[1]], neg_rope[1, :ln[1]])


def test_identities(lumina):
    model, inputs, negative = lumina
    base = run(model, inputs)
    with nagkit.apply(model, negative=negative, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
                "encoder_attention_mask": inputs["encoder_attention_mask"]}
        guide.update(negative=same, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1


def test_reversed_time_window(lumina):
    """The pipeline passes 1 − t/1000, which is the schedule position u itself."""
    model, inputs, negative = lumina
    base = run(model, inputs)
    u = float(inputs["timestep"][0])  # 0.3
    with nagkit.apply(model, negative=negative, scale=SCALE, start=u + 0.1, end=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
        guide.update(start=0.0, end=u - 0.1)
        assert torch.equal(run(model, inputs), base)
        guide.update(start=u - 0.1, end=u + 0.1)
        assert not torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 1, "unguided": 2}


def test_batched_cfg_rows_and_broadcast_negative(lumina):
    """A bare denoiser called with ``[uncond; cond]`` rows (batch 2R, negative of R rows) guides the conditional half
    only; a one-row negative guides every row like the same negative given per row."""
    model, inputs, negative = lumina
    g = torch.Generator().manual_seed(3)
    uncond = {**inputs, "encoder_hidden_states": torch.randn(inputs["encoder_hidden_states"].shape, generator=g)}
    cfg = {k: torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) and v.ndim else v for k, v in inputs.items()}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        both = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
        guided = run(model, inputs)
    torch.testing.assert_close(both[:2], run(model, uncond), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[2:], guided, atol=1e-5, rtol=1e-5)
    one = {k: v[1:] for k, v in negative.items()}
    tiled = {k: torch.cat([v, v]) for k, v in one.items()}
    with nagkit.apply(model, negative=one, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        a = run(model, inputs)
        assert guide.state.last_packing.rows == slice(0, 2)
    with nagkit.apply(model, negative=tiled, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), a, atol=1e-6, rtol=1e-6)


def test_proportional_attention_uses_the_prompt_length(lumina):
    """``base_sequence_length`` (never passed by the model itself; injected here) scales every branch by the
    prompt-only joint length, as the plain model's call: negative == prompt is the plain output, and with a negative
    shorter than every prompt row the doubled reference (whose padded length is the prompt's) agrees."""
    model, inputs, _ = lumina
    unscaled = run(model, inputs)
    handles = [m.register_forward_pre_hook(lambda m, a, k: (a, {**k, "base_sequence_length": 8}), with_kwargs=True)
               for n, m in model.named_modules() if _main(n, m)]
    try:
        plain = run(model, inputs)
        assert (plain - unscaled).abs().max() > 1e-4
        same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
                "encoder_attention_mask": inputs["encoder_attention_mask"]}
        with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA):
            torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(7)
        short_mask = torch.ones(2, 5, dtype=torch.long)
        short_mask[1, 3:] = 0
        short = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g), "encoder_attention_mask": short_mask}
        with nagkit.apply(model, negative=short, scale=SCALE, tau=TAU, alpha=ALPHA):
            out = run(model, inputs)
        torch.testing.assert_close(out, reference(model, inputs, short), atol=1e-5, rtol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_remove_restores_exactly_and_refusals(lumina):
    model, inputs, negative = lumina
    base = run(model, inputs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    assert all(m.processor is before[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    seen = {}
    handle = model.layers[1].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("p", m.processor) and None)
    refiner = model.context_refiner[0].attn.register_forward_pre_hook(
        lambda m, a: seen.setdefault("r", m.processor) and None)
    run(model, inputs)
    handle.remove()
    refiner.remove()
    assert isinstance(seen["p"], nagkit.adapters.NAGProcessor) and seen["p"].inner is before["layers.1.attn"]
    assert seen["r"] is before["context_refiner.0.attn"]  # the refiners are never guided
    guide.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(before[n] is after[n] for n in before)
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
                   for m in model.modules())
    assert "forward" not in model.layers[0].__dict__ and "forward" not in model.__dict__
    assert torch.equal(run(model, inputs), base)

    with pytest.raises(ValueError, match="mode='official' is not available for Lumina2Transformer2DModel"):
        nagkit.apply(model, negative=negative, mode="official")
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = model.layers[0].attn.processor
    model.layers[0].attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(NotImplementedError, match="layers.0.attn uses AttnProcessor2_0, which nagkit cannot "
                                                      "guide; supported processors here: Lumina2AttnProcessor2_0"):
            nagkit.apply(model, negative=negative)
    finally:
        model.layers[0].attn.set_processor(original)
    with nagkit.apply(model, negative={"encoder_hidden_states": torch.zeros(1, 3, 8)}):
        with pytest.raises(ValueError, match="negative embeddings have 8 channels, the prompt's have 16"):
            run(model, inputs)
    assert torch.equal(run(model, inputs), base)


# ------------------------------------------------------------------------------------------------ the tiny pipeline
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES["tiny-lumina2"](seed=0)


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=2, guidance=1.0, **kwargs):
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, generator=generator, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", **{**TINY_CALL, **kwargs})[0]


def test_pipeline_guides_cfg_branch_only_and_removes(pipe):
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        base = generate(pipe, guidance=3.0, negative_prompt="ugly")
        plain = list(outputs)
        outputs.clear()
        before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
        guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5)
        assert guide.config.tau == 2.5  # the lumina2 preset
        out = generate(pipe, guidance=3.0, negative_prompt="ugly")
        assert guide.state.calls == {"guided": 2, "unguided": 2}  # cond calls guided, uncond calls (their text) not
        assert torch.equal(outputs[1], plain[1])  # first step's uncond call: untouched (later ones see new latents)
        assert (outputs[0] - plain[0]).abs().max() > 1e-4
        assert (out - base).abs().max() > 1e-4
        guide.state.calls.update(guided=0, unguided=0)
        generate(pipe, guidance=3.0, cfg_trunc_ratio=0.5)  # CFG truncation: the second step has no uncond call
        assert guide.state.calls == {"guided": 2, "unguided": 1}
        guide.remove()
    finally:
        handle.remove()
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    after = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert all(before[k] is after[k] for k in before)
    assert torch.equal(generate(pipe, guidance=3.0, negative_prompt="ugly"), base)


def test_pipeline_negative_is_encoded_like_the_cfg_negative(pipe):
    """No system prompt on the NAG negative, as on the pipeline's own CFG negative (prompts get one)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(guide.state.negative))
    try:
        with nagkit.apply(pipe, negative_prompt=["blurry", "dark night"], scale=5.0) as guide:
            generate(pipe, prompt=["a red cat", "a blue dog"], seeds=(0, 1, 2, 3), num_images_per_prompt=2,
                     steps=1)
    finally:
        handle.remove()
    neg = seen[0]
    _, _, cfg_neg, cfg_mask = pipe.encode_prompt(["a red cat", "a blue dog"], negative_prompt=["blurry", "dark night"],
                                                 num_images_per_prompt=2, max_sequence_length=96)
    assert neg.embeds.shape[0] == 4
    assert torch.equal(neg.embeds, cfg_neg) and torch.equal(neg.mask, cfg_mask)
    assert int(cfg_mask[0].sum()) == len(pipe.tokenizer("blurry").input_ids)  # no system prompt


def test_pipeline_identities_and_batch(pipe):
    base = generate(pipe)
    emb, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=96)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0) as guide:
        assert torch.equal(generate(pipe), base)
        guide.update(negative_prompt_embeds=emb, negative_prompt_attention_mask=mask, scale=5.0, alpha=0.5)
        torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=1e-5)  # negative == prompt
        assert guide.state.calls["guided"] == 2
    prompts, negatives = ["a red cat sitting on a table", "a blue dog"], ["blurry low quality", "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        batch = generate(pipe, prompt=prompts, seeds=(0, 1), guidance=2.0, steps=1)
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(pipe, prompt=prompts[i], seeds=(i,), guidance=2.0, steps=1)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)


def test_pipeline_window_follows_the_schedule(pipe):
    base = generate(pipe)
    first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]  # u of the two steps
    between = (first + second) / 2
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=between, end=between) as guide:
        assert torch.equal(generate(pipe), base) and guide.state.calls["guided"] == 0
        guide.update(start=0.0, end=between)  # the first step only
        first_only = generate(pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 3}
        guide.update(end=1.0)
        everywhere = generate(pipe)
    assert not torch.equal(first_only, base) and not torch.equal(first_only, everywhere)


# ------------------------------------------------------------------------------------------------ nagkit bench
def test_bench_counts_the_model_on_the_meta_device():
    """The forward reads caption lengths (``mask.sum(1).tolist()``); the bench's meta mask answers that, so the model
    is counted on the meta device: equal to a real CPU count with an all-ones mask (plain and guided), nagkit's
    count is the analytic minimum, and the doubled way costs exactly one more image→image attention per layer."""
    from dataclasses import replace

    from nagkit.bench import Geometry, build_inputs, load_families, run_family
    from nagkit.bench.families import build_model
    from nagkit.bench.flops import count_flops, shared_image_attention_flops

    published = load_families()["lumina2"]
    config = dict(tiny_lumina2_transformer().config)
    spec = replace(published, name="tiny-lumina2", config=config, time={},
                   geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=16, text_tokens=6,
                                     text_dim=16, negative_tokens=4, mask=True))
    result = run_family(spec, short_negative=None)
    v = result.variants
    assert not result.notes and result.nag_minus_min == 0 and v["nag"].flops == v["min"].flops > v["none"].flops
    assert v["official"].flops - v["nag"].flops == shared_image_attention_flops(build_model(spec), spec, True) > 0

    meta_model, meta = build_model(spec), build_inputs(spec)
    cpu_model = tiny_lumina2_transformer()
    g = torch.Generator().manual_seed(0)
    real = {k: (torch.ones(v.shape, dtype=torch.long) if v.dtype == torch.long else torch.randn(v.shape, generator=g))
            for k, v in meta.kwargs.items()}
    neg = {"encoder_hidden_states": torch.randn(1, 4, 16, generator=g),
           "encoder_attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert count_flops(lambda: meta_model(**meta.kwargs)) == count_flops(lambda: cpu_model(**real)) == \
        v["none"].flops
    with nagkit.apply(cpu_model, negative=neg):
        assert count_flops(lambda: cpu_model(**real)) == v["nag"].flops
