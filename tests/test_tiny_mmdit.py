"""Tests for the tiny offline MM-DiT pipelines in ``nagkit.tiny.mmdit`` (SD3, SD3.5, Flux, Flux Kontext, Chroma)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
from diffusers import ChromaPipeline, FluxKontextPipeline, FluxPipeline, StableDiffusion3Pipeline

from nagkit.tiny import mmdit
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

PROMPT, NEGATIVE = "a red cat sitting on a wooden table, zxqv", "blurry, low quality"
# name -> (builder, pipeline class, kwargs that switch its CFG on)
SPECS: dict[str, tuple[Any, type, dict[str, Any]]] = {
    "tiny-sd3": (mmdit.tiny_sd3_pipeline, StableDiffusion3Pipeline, {"guidance_scale": 5.0}),
    "tiny-sd35": (mmdit.tiny_sd35_pipeline, StableDiffusion3Pipeline, {"guidance_scale": 5.0}),
    "tiny-flux": (mmdit.tiny_flux_pipeline, FluxPipeline, {"true_cfg_scale": 4.0}),
    "tiny-flux-dev": (mmdit.tiny_flux_dev_pipeline, FluxPipeline, {"true_cfg_scale": 4.0}),
    "tiny-flux-kontext": (mmdit.tiny_flux_kontext_pipeline, FluxKontextPipeline, {"true_cfg_scale": 4.0}),
    "tiny-chroma": (mmdit.tiny_chroma_pipeline, ChromaPipeline, {"guidance_scale": 5.0}),
}
NAMES = list(SPECS)
SD3 = {"tiny-sd3", "tiny-sd35"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to open a network connection."""

    def _blocked(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Tiny ops gain nothing from threads; one thread keeps the module fast on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    """One seed-0 pipeline per name, built once for the module."""
    return {name: SPECS[name][0](seed=0) for name in NAMES}


def _call(pipe: Any, name: str, cfg: bool = False, output_type: str = "pt", **overrides: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,  # SD3 / Chroma: no CFG; flux-dev: embedded guidance 1; schnell / Chroma: unused
        "output_type": output_type,
        "generator": torch.Generator().manual_seed(0),
        **TINY_CALL_KWARGS[name],
    }
    if name == "tiny-flux-kontext":
        kwargs["image"] = tiny_condition_image(kwargs["height"], kwargs["width"])
    if cfg:
        kwargs.update(negative_prompt=NEGATIVE, **SPECS[name][2])
    kwargs.update(overrides)
    return pipe(**kwargs)[0]


def _capture_transformer_inputs(
    pipe: Any, name: str, **overrides: Any
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Run a 2-step latent call; return its latents and the tensor kwargs of every transformer call."""
    seen: list[dict[str, torch.Tensor]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append({k: v for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        latents = _call(pipe, name, output_type="latent", **overrides)
    finally:
        handle.remove()
    return latents, seen


def test_registered() -> None:
    for name, (builder, _, _) in SPECS.items():
        assert TINY_PIPELINES[name] is builder
        kw = TINY_CALL_KWARGS[name]
        assert kw["height"] % 16 == 0 and kw["width"] % 16 == 0 and kw["max_sequence_length"] <= 512


@pytest.mark.parametrize("name", NAMES)
def test_build_call_cfg_and_determinism(name: str, pipes: dict[str, Any]) -> None:
    pipe = pipes[name]
    assert type(pipe) is SPECS[name][1]
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) < 1_000_000

    kw = TINY_CALL_KWARGS[name]
    plain = _call(pipe, name)
    guided = _call(pipe, name, cfg=True)
    for out in (plain, guided):
        assert tuple(out.shape) == (1, 3, kw["height"], kw["width"])
        assert torch.isfinite(out).all()
    assert (plain - guided).abs().max() > 1e-5  # CFG does something
    assert (plain - _call(pipe, name, prompt="a blue dog in the snow")).abs().max() > 1e-6  # the text matters
    assert torch.equal(guided, _call(pipe, name, cfg=True))  # same pipeline, same generator seed
    assert torch.equal(plain, _call(SPECS[name][0](seed=0), name))  # rebuilt with the same seed

    other = SPECS[name][0](seed=1)
    a, b = pipe.transformer.state_dict(), other.transformer.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_latents_and_text_lengths(name: str, pipes: dict[str, Any]) -> None:
    pipe = pipes[name]
    kw = TINY_CALL_KWARGS[name]
    h, w, text_len = kw["height"] // 8, kw["width"] // 8, kw["max_sequence_length"]
    latents, calls = _capture_transformer_inputs(pipe, name)
    assert len(calls) == 2
    states = calls[0]["encoder_hidden_states"]
    if name in SD3:
        assert tuple(latents.shape) == (1, 16, h, w)
        # CLIP (77 tokens, 16 + 32 wide, zero-padded to the T5 width) then T5.
        assert tuple(states.shape) == (1, 77 + text_len, 64)
        assert tuple(calls[0]["pooled_projections"].shape) == (1, 48)
    else:
        # Flux-family "latent" output is packed: (batch, (h/2) * (w/2), 4 * 16).
        assert tuple(latents.shape) == (1, (h // 2) * (w // 2), 64)
        assert tuple(states.shape) == (1, text_len, 32)
    assert torch.isfinite(latents).all()

    if name == "tiny-chroma":  # the T5 padding mask (plus one pad token), extended with ones for the image tokens
        mask = calls[0]["attention_mask"]
        assert tuple(mask.shape) == (1, text_len + (h // 2) * (w // 2)) and 0 < int(mask[0, :text_len].sum()) < text_len

    # CFG: SD3 batches [uncond, cond] into one call; Flux / Kontext / Chroma run a second (negative) pass.
    _, cfg_calls = _capture_transformer_inputs(pipe, name, negative_prompt=NEGATIVE, **SPECS[name][2])
    if name in SD3:
        assert len(cfg_calls) == 2 and cfg_calls[0]["hidden_states"].shape[0] == 2
    else:
        assert len(cfg_calls) == 4 and all(c["hidden_states"].shape[0] == 1 for c in cfg_calls)


def test_sd3_blocks() -> None:
    for builder, dual in ((mmdit.tiny_sd3_pipeline, set()), (mmdit.tiny_sd35_pipeline, {0})):
        blocks = builder(seed=0).transformer.transformer_blocks
        assert len(blocks) == 2 and blocks[-1].context_pre_only and not blocks[0].context_pre_only
        assert {i for i, b in enumerate(blocks) if b.use_dual_attention} == dual
        for i, block in enumerate(blocks):
            assert block.attn.norm_q is not None  # qk_norm="rms_norm"
            assert (getattr(block, "attn2", None) is not None) == (i in dual)
            if i in dual:
                assert block.attn2.add_k_proj is None  # image-only self-attention


def test_flux_guidance(pipes: dict[str, Any]) -> None:
    assert pipes["tiny-flux"].transformer.config.guidance_embeds is False
    assert pipes["tiny-flux-dev"].transformer.config.guidance_embeds is True
    # schnell ignores guidance_scale; dev embeds it.
    assert torch.equal(_call(pipes["tiny-flux"], "tiny-flux"), _call(pipes["tiny-flux"], "tiny-flux", guidance_scale=5))
    dev = pipes["tiny-flux-dev"]
    assert (_call(dev, "tiny-flux-dev") - _call(dev, "tiny-flux-dev", guidance_scale=5.0)).abs().max() > 1e-5


def test_kontext_image_conditioning(pipes: dict[str, Any]) -> None:
    pipe, name = pipes["tiny-flux-kontext"], "tiny-flux-kontext"
    kw = TINY_CALL_KWARGS[name]
    n_image = (kw["height"] // 16) * (kw["width"] // 16)
    _, calls = _capture_transformer_inputs(pipe, name)
    # The condition image stays at the call size (_auto_resize=False): its tokens double the image sequence.
    assert calls[0]["hidden_states"].shape[1] == 2 * n_image
    assert _capture_transformer_inputs(pipe, name, image=None)[1][0]["hidden_states"].shape[1] == n_image
    with_image = _call(pipe, name)
    other_image = _call(pipe, name, image=tiny_condition_image(kw["height"], kw["width"], seed=1))
    assert (with_image - other_image).abs().max() > 1e-5
