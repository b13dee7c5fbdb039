"""Wan Animate: the bare ``WanAnimateTransformer3DModel`` and ``WanAnimatePipeline`` (tiny-wan-animate) against the
reference in tests/reference.py (two full attentions per guided layer, literal paper formula): the CLIP image context
added after NAG, the reference image / pose / face conditioning never negated, the CFG call untouched."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import nagkit
from nagkit.adapters.base import NAGProcessor
from nagkit.adapters.wananimate import tiny_animate_inputs, tiny_wan_animate_transformer
from nagkit.cli.main import main
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES
from tests.reference import reference_forward

S, TAU, A = 4.0, 2.5, 0.5
NAME = "tiny-wan-animate"
PROMPT, NEGATIVE = "a red cat dancing on a table", "blurry low quality"
N_IMAGE = 17  # CLIP tokens of the tiny image encoder (32x32, patch 8, + class token)


def _guided(model, kwargs, negative, **settings):
    with torch.no_grad(), nagkit.apply(model, negative=negative, **{"scale": S, "tau": TAU, "alpha": A, **settings}):
        return model(**kwargs)[0]


# ------------------------------------------------------------------------------------------------ the denoiser
def _denoiser_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 36, 3, 4, 4, generator=g), "timestep": torch.tensor([900.0] * batch),
            "encoder_hidden_states": torch.randn(batch, 512, 16, generator=g),  # the processor splits at 512
            "encoder_hidden_states_image": torch.randn(batch, 5, 8, generator=g),
            "pose_hidden_states": torch.randn(batch, 16, 2, 4, 4, generator=g),
            "face_pixel_values": torch.randn(batch, 3, 5, 16, 16, generator=g)}


def test_denoiser_matches_reference_and_identities():
    """Bare WanAnimateTransformer3DModel: NAG on attn2's text part; the CLIP image context (own K/V, as the published
    model) is added after NAG, never negated; per-row negatives (batch 2); identities; window; removal."""
    model = tiny_wan_animate_transformer(0)
    kwargs = _denoiser_inputs(2)
    negative = {"encoder_hidden_states": torch.randn(2, 512, 16, generator=torch.Generator().manual_seed(7))}
    ref = reference_forward(model, kwargs, negative, S, TAU, A, n_image=5)[0]
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        plain = model(**kwargs)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, scale=1.0), plain, atol=0, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, alpha=0.0), plain, atol=1e-6, rtol=0)
    same = {"encoder_hidden_states": kwargs["encoder_hidden_states"]}
    torch.testing.assert_close(_guided(model, kwargs, same), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, start=0.5), plain, atol=0, rtol=0)  # t=900: u=0.1
    with torch.no_grad():
        assert torch.equal(model(**kwargs)[0], plain)  # removed
    assert all(m.processor is originals[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    guided = {n for n, m in model.named_modules() if n.endswith("attn2")}
    assert guided == {"blocks.0.attn2", "blocks.1.attn2"}  # the face adapters are not text attention


def test_unsupported_processor_is_refused_clearly():
    model = tiny_wan_animate_transformer(0)
    model.blocks[0].attn2.set_processor(WanAttnProcessor())  # Wan's processor class, not Animate's own copy
    negative = {"encoder_hidden_states": torch.zeros(1, 512, 16)}
    with pytest.raises(NotImplementedError, match="blocks.0.attn2 uses WanAttnProcessor, which nagkit cannot guide"):
        nagkit.apply(model, negative=negative)
    assert not any(isinstance(p, NAGProcessor) for p in model.attn_processors.values())


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES[NAME](seed=0)


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=2, guidance=1.0, **kwargs):
    call = dict(TINY_CALL_KWARGS[NAME], num_inference_steps=steps, output_type="latent", guidance_scale=guidance,
                **tiny_animate_inputs())
    call.update(kwargs)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, generator=generator, **call)[0]


class Recorder:
    """The denoiser's keyword arguments and outputs, per call."""

    def __init__(self, model):
        self.inputs, self.outputs = [], []
        self.handles = [
            model.register_forward_pre_hook(lambda m, a, kw: self.inputs.append(dict(kw)) and None, with_kwargs=True),
            model.register_forward_hook(lambda m, a, out: self.outputs.append(out[0].detach().clone()))]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_tiny_pipeline_builds_deterministically(pipe):
    assert type(pipe).__name__ == "WanAnimatePipeline"
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    video = generate(pipe, output_type="pt")
    assert tuple(video.shape) == (1, 5, 3, 32, 32) and torch.isfinite(video).all()
    latents = generate(pipe)
    assert tuple(latents.shape) == (1, 16, 3, 4, 4)  # 2 latent frames + the reference frame
    assert torch.equal(latents, generate(pipe))
    other = TINY_PIPELINES[NAME](seed=1).transformer.state_dict()
    mine = pipe.transformer.state_dict()
    assert any(not torch.equal(mine[k], other[k]) for k in mine)
    attn2 = [m for n, m in pipe.transformer.named_modules() if n.endswith("attn2")]
    assert attn2 and all(m.add_k_proj is not None for m in attn2)  # the CLIP image context has its own K/V


def test_identities_and_removal_without_a_trace(pipe):
    base = generate(pipe)
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0, end=1.0)
    assert torch.equal(generate(pipe), base)  # scale 1: bit-identical
    guide.update(negative_prompt=PROMPT, scale=5.0, alpha=0.5)
    torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=1e-5)  # negative == prompt
    guide.update(negative_prompt=NEGATIVE)
    guided = generate(pipe)
    assert torch.isfinite(guided).all() and (guided - base).abs().max() > 1e-4
    assert guide.state.calls["guided"] >= 2
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    assert all(m.processor is before[n] for n, m in pipe.transformer.named_modules() if hasattr(m, "processor"))
    assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(generate(pipe), base)


def test_guided_call_matches_reference_conditioning_never_negated(pipe):
    """The conditional call of a guided pipeline run equals the reference computed on that call's own inputs (CLIP
    image context, reference/pose latents, face video) with the NAG negative as the only text difference."""
    recorder, seen = Recorder(pipe.transformer), {}
    try:
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=S, tau=TAU, alpha=A) as guide:
            handle = pipe.transformer.register_forward_pre_hook(
                lambda m, a: seen.setdefault("negative", guide.state.negative) and None)
            generate(pipe, steps=1)
            handle.remove()
    finally:
        recorder.remove()
    (kwargs,), (guided,) = recorder.inputs, recorder.outputs
    assert kwargs["encoder_hidden_states_image"].shape[1] == N_IMAGE
    negative = seen["negative"].embeds
    with torch.no_grad():  # as in the pipeline call
        expected = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    assert torch.equal(negative, expected)
    ref = reference_forward(pipe.transformer, kwargs, {"encoder_hidden_states": negative}, S, TAU, A,
                            n_image=N_IMAGE)[0]
    torch.testing.assert_close(guided, ref, atol=1e-5, rtol=0)


def test_cfg_on_top_guides_only_the_conditional_call(pipe):
    """With CFG the unconditional call (CFG negative text, blanked face video) is untouched; the NAG negative is
    encoded exactly like the CFG negative."""
    recorder, seen = Recorder(pipe.transformer), {}
    try:
        base_final = generate(pipe, guidance=3.0, negative_prompt=NEGATIVE)
        base_in, base_out = list(recorder.inputs), list(recorder.outputs)
        recorder.inputs.clear(), recorder.outputs.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5, end=1.0) as guide:
            handle = pipe.transformer.register_forward_pre_hook(
                lambda m, a: seen.setdefault("negative", guide.state.negative) and None)
            final = generate(pipe, guidance=3.0, negative_prompt=NEGATIVE)
            handle.remove()
            calls, negative = dict(guide.state.calls), seen["negative"]
    finally:
        recorder.remove()
    assert calls == {"guided": 2, "unguided": 2}
    assert (final - base_final).abs().max() > 1e-4 and torch.isfinite(final).all()
    assert torch.equal(recorder.outputs[1], base_out[1])  # first step, unconditional: bit-identical
    assert (recorder.outputs[0] - base_out[0]).abs().max() > 1e-4
    uncond = recorder.inputs[1]
    assert (uncond["face_pixel_values"] == -1).all()  # the pipeline blanks the face video of its uncond call
    assert torch.equal(uncond["face_pixel_values"], base_in[1]["face_pixel_values"])
    # the NAG negative is the same string as the CFG negative here: the same embeddings as the uncond call's text
    assert torch.equal(negative.embeds, uncond["encoder_hidden_states"])


def test_per_sample_negatives_equal_single_runs(pipe):
    prompts = ["a red cat dancing on a table", "a blue dog running in the snow"]
    negatives = ["blurry low quality", "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        batch = generate(pipe, prompt=prompts, seeds=(0, 1), guidance=2.0)
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(pipe, prompt=prompts[i], seeds=(i,), guidance=2.0)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)


def test_window_and_replace_mode(pipe):
    base = generate(pipe)
    first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]
    between = (first + second) / 2
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=between, end=between) as guide:
        assert torch.equal(generate(pipe), base) and guide.state.calls["guided"] == 0
        guide.update(start=0.0)
        guide.state.calls.update(guided=0, unguided=0)
        first_only = generate(pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 1}
    assert not torch.equal(first_only, base)
    # replace mode (background video and mask): the same denoiser calls
    inputs = tiny_animate_inputs()
    replace = {"mode": "replace", "background_video": inputs["pose_video"],
               "mask_video": [img.convert("L") for img in inputs["pose_video"]]}
    plain = generate(pipe, **replace)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0) as guide:
        assert torch.equal(generate(pipe, **replace), plain)
        guide.update(scale=5.0)
        assert (generate(pipe, **replace) - plain).abs().max() > 1e-4


def test_every_segment_of_a_long_video_is_guided(pipe):
    """9 conditioning frames in segments of 5 (1 frame carried over): two denoising loops, each conditional call
    guided with the same negative; scale 1 stays bit-identical."""
    long = tiny_animate_inputs(frames=9)
    plain = generate(pipe, output_type="pt", **long)
    assert plain.shape[1] == 9
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0) as guide:
        assert torch.equal(generate(pipe, output_type="pt", **long), plain)
        guide.update(scale=5.0)
        guide.state.calls.update(guided=0, unguided=0)
        guided = generate(pipe, output_type="pt", **long)
        assert guide.state.calls == {"guided": 4, "unguided": 0}  # 2 segments x 2 steps
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4


def test_command_line_knows_it_and_refuses_generate(capsys):
    assert main(["info", NAME]) == 0
    assert "supported (WanAnimatePipeline" in capsys.readouterr().out
    assert main(["generate", NAME, "a red cat", "--steps", "1"]) == 2
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert last.startswith("nagkit: error: WanAnimatePipeline needs pose_video, face_video")
