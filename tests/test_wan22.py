"""Wan 2.2: per-expert NAG on A14B (``expert=``), the I2V A14B path (latent image conditioning, no image context),
Wan 2.1-style image context (never negated), TI2V-5B per-token timesteps; reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch

import nagkit
from nagkit.adapters.wan import _tiny_wan_transformer
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES
from tests.reference import reference_forward

S, TAU, A = 4.0, 2.5, 0.5


def _inputs(in_channels=16, batch=1, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, in_channels, 2, 4, 4, generator=g),
            "timestep": torch.tensor([900.0] * batch),
            "encoder_hidden_states": torch.randn(batch, text, 16, generator=g)}


def _guided(model, kwargs, negative, **settings):
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=S, tau=TAU, alpha=A, **settings):
        return model(**kwargs)[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_i2v_a14b_latent_conditioning_matches_reference(batch):
    """Wan 2.2 I2V A14B: in_channels 36 (noise | mask | image latents), no image context: NAG on the text only."""
    model = _tiny_wan_transformer(0, text_dim=16, in_channels=36)
    kwargs = _inputs(36, batch)
    negative = {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(9))}
    ref = reference_forward(model, kwargs, negative, S, TAU, A)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)


def test_image_context_is_never_negated():
    """Wan 2.1-style I2V (image context through add_k_proj): NAG on the text part, the image part added after."""
    model = _tiny_wan_transformer(0, text_dim=16, in_channels=36, image_dim=8)
    kwargs = _inputs(36, 2)
    g = torch.Generator().manual_seed(3)
    kwargs["encoder_hidden_states"] = torch.randn(2, 512, 16, generator=g)  # the processor splits at 512 text tokens
    kwargs["encoder_hidden_states_image"] = torch.randn(2, 5, 8, generator=g)
    negative = {"encoder_hidden_states": torch.randn(2, 512, 16, generator=g)}
    ref = reference_forward(model, kwargs, negative, S, TAU, A, n_image=5)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)


def test_ti2v_per_token_timesteps():
    """TI2V-5B (expand_timesteps): timestep (B, N) per token; the window reads its maximum."""
    model = _tiny_wan_transformer(0, text_dim=16, in_channels=16)
    kwargs = _inputs(16, 2)
    n = 2 * 2 * 2  # frames x (4/2) x (4/2) tokens
    ts = torch.full((2, n), 800.0)
    ts[:, :4] = 0.0  # the conditioning frame's tokens (TI2V image-to-video) are clean
    kwargs["timestep"] = ts
    negative = {"encoder_hidden_states": torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(4))}
    ref = reference_forward(model, kwargs, {"encoder_hidden_states": negative["encoder_hidden_states"].expand(2, -1,
                                                                                                              -1)},
                            S, TAU, A)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = model(**kwargs)[0]
    # max timestep 800 = schedule position 0.2: a window starting at 0.5 leaves the call plain, one ending at 0.5 not
    torch.testing.assert_close(_guided(model, kwargs, negative, start=0.5), plain, atol=0, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, end=0.5), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ expert=
@pytest.fixture(scope="module")
def wan22():
    return TINY_PIPELINES["tiny-wan22"](seed=0)


def _run(pipe, guidance=1.0):
    call = dict(TINY_CALL_KWARGS["tiny-wan22"], num_inference_steps=4, output_type="latent", guidance_scale=guidance)
    if guidance > 1:
        call["guidance_scale_2"] = guidance
    return pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **call)[0]



def test_expert_selects_the_guided_transformer(wan22):
    pipe = wan22
    plain = _run(pipe)
    outs = {}
    for expert in ("high", "low", "both"):
        with nagkit.apply(pipe, negative_prompt="blurry", expert=expert) as guide:
            assert guide.denoisers == {"high": [pipe.transformer], "low": [pipe.transformer_2],
                                       "both": [pipe.transformer, pipe.transformer_2]}[expert]
            outs[expert] = _run(pipe)
    assert all((outs[e] - plain).abs().max() > 1e-4 for e in outs)
    assert (outs["high"] - outs["low"]).abs().max() > 1e-4
    # each expert with its own settings: switching one expert off equals guiding only the other one
    with nagkit.apply(pipe, negative_prompt="blurry") as guide:
        guide.update(expert="low", scale=1.0)
        assert guide.expert_config("low").scale == 1.0 and guide.expert_config("high").scale == guide.config.scale
        torch.testing.assert_close(_run(pipe), outs["high"], atol=0, rtol=0)
        guide.update(expert="low", scale=guide.config.scale).update(expert="high", scale=1.0)
        torch.testing.assert_close(_run(pipe), outs["low"], atol=0, rtol=0)
        guide.update(expert="high", end=0.0)  # its own window: off from the start
        torch.testing.assert_close(_run(pipe), outs["low"], atol=0, rtol=0)
    torch.testing.assert_close(_run(pipe), plain, atol=0, rtol=0)  # removed


def test_expert_with_cfg_and_removal(wan22):
    pipe = wan22
    plain = _run(pipe, guidance=3.0)
    before = {n: m.processor for d in (pipe.transformer, pipe.transformer_2) for n, m in d.named_modules()
              if hasattr(m, "processor")}
    guide = nagkit.apply(pipe, negative_prompt="blurry", expert="low", scale=1.0)
    torch.testing.assert_close(_run(pipe, guidance=3.0), plain, atol=0, rtol=0)  # scale 1: identity
    guide.update(scale=5.0)
    assert (_run(pipe, guidance=3.0) - plain).abs().max() > 1e-4
    guide.remove()
    torch.testing.assert_close(_run(pipe, guidance=3.0), plain, atol=0, rtol=0)
    after = {n: m.processor for d in (pipe.transformer, pipe.transformer_2) for n, m in d.named_modules()
             if hasattr(m, "processor")}
    assert before == after


def test_expert_errors(wan22):
    with pytest.raises(ValueError, match="expert must be"):
        nagkit.apply(wan22, negative_prompt="x", expert="mid")
    single = TINY_PIPELINES["tiny-wan"](seed=0)
    with pytest.raises(ValueError, match="two-expert pipeline"):
        nagkit.apply(single, negative_prompt="x", expert="high")
    with nagkit.apply(wan22, negative_prompt="x", expert="high") as guide, \
            pytest.raises(ValueError, match="guides only the 'high' expert"):
        guide.update(expert="low", scale=3.0)


# ------------------------------------------------------------------------------------------------ pipelines
def test_i2v_a14b_and_ti2v_pipelines_end_to_end():
    """WanImageToVideoPipeline with two experts and boundary_ratio (2.2 I2V A14B: no image encoder, the image enters
    as latents) and WanPipeline with expand_timesteps (TI2V-5B style: per-token timesteps)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    from nagkit.adapters.wan import _ensure_wan_i2v_prompt_clean

    _ensure_wan_i2v_prompt_clean()
    base = TINY_PIPELINES["tiny-wan22"](seed=0)
    parts = {k: getattr(base, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    i2v = WanImageToVideoPipeline(**parts, transformer=_tiny_wan_transformer(0, 16, in_channels=36),
                                  transformer_2=_tiny_wan_transformer(1, 16, in_channels=36), boundary_ratio=0.875)
    ti2v = WanPipeline(**parts, transformer=base.transformer, expand_timesteps=True)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    for pipe, extra in ((i2v, {"image": image}), (ti2v, {})):
        def run(pipe=pipe, extra=extra):
            return pipe(prompt="a red cat", height=32, width=32, num_frames=5, num_inference_steps=4,
                        guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0),
                        **extra)[0]
        plain = run()
        with nagkit.apply(pipe, negative_prompt="blurry") as guide:
            assert (run() - plain).abs().max() > 1e-4
            assert guide.state.calls == {"guided": 4, "unguided": 0}
            guide.update(scale=1.0)
            torch.testing.assert_close(run(), plain, atol=0, rtol=0)
        if pipe is i2v:
            with nagkit.apply(pipe, negative_prompt="blurry", expert="low") as guide:
                assert guide.denoisers == [pipe.transformer_2]
                run()
                # 4 steps [999, 900, 750, 500]: the high expert (no hook) runs 2, the guided low expert 2
                assert guide.state.calls == {"guided": 2, "unguided": 0}
        torch.testing.assert_close(run(), plain, atol=0, rtol=0)


def test_cli_generate_tiny_wan22(tmp_path):
    from PIL import Image

    from nagkit.cli.main import main

    out = tmp_path / "clip.gif"
    assert main(["generate", "tiny-wan22", "a red cat", "--negative", "blurry", "--steps", "2", "--frames", "5",
                 "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).n_frames == 5 and out.with_suffix(".json").exists()


def test_deepcopy_keeps_expert_settings(wan22):
    import copy

    with nagkit.apply(wan22, negative_prompt="blurry") as guide:
        guide.update(expert="low", scale=1.0)
        expected = _run(wan22)
        twin = copy.deepcopy(wan22)
        twin_guide = twin._nagkit_guide
        assert twin_guide.expert_config("low").scale == 1.0 and twin_guide.denoisers == [twin.transformer,
                                                                                          twin.transformer_2]
        torch.testing.assert_close(_run(twin), expected, atol=0, rtol=0)
        twin_guide.remove()
