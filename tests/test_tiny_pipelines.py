"""Tests for the tiny offline diffusers pipelines in ``nagkit.tiny.pipelines``."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
from diffusers import (
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
)

from nagkit.tiny.pipelines import (
    TINY_CALL_KWARGS,
    TINY_PIPELINES,
    tiny_clip_tokenizer,
    tiny_condition_image,
    tiny_gemma_tokenizer,
    tiny_sana_pipeline,
    tiny_t5_tokenizer,
    tiny_wan22_pipeline,
)

# The cross-attention pipelines; the MM-DiT ones are covered by test_tiny_mmdit.py.
NAMES = ["tiny-sd15", "tiny-sdxl", "tiny-wan", "tiny-wan22", "tiny-wan-i2v", "tiny-pixart-sigma", "tiny-sana"]
VIDEO = {"tiny-wan", "tiny-wan22", "tiny-wan-i2v"}
EXPECTED_CLASS = {
    "tiny-sd15": StableDiffusionPipeline,
    "tiny-sdxl": StableDiffusionXLPipeline,
    "tiny-wan": WanPipeline,
    "tiny-wan22": WanPipeline,
    "tiny-wan-i2v": WanImageToVideoPipeline,
    "tiny-pixart-sigma": PixArtSigmaPipeline,
    "tiny-sana": SanaPipeline,
}
# (channels, spatial factor, temporal factor) of each pipeline's latent space.
LATENT_LAYOUT = {
    "tiny-sd15": (4, 8, None),
    "tiny-sdxl": (4, 8, None),
    "tiny-wan": (16, 8, 4),
    "tiny-wan22": (16, 8, 4),
    "tiny-wan-i2v": (16, 8, 4),
    "tiny-pixart-sigma": (4, 8, None),
    "tiny-sana": (4, 4, None),
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to open a network connection."""

    def _blocked(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _call(pipe: Any, name: str, output_type: str = "pt", seed: int = 0, **overrides: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = {
        "prompt": "a red cat sitting on a wooden table, zxqv",
        "negative_prompt": "blurry, low quality",
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "output_type": output_type,
        "generator": torch.Generator().manual_seed(seed),
        **TINY_CALL_KWARGS[name],
    }
    if name == "tiny-wan-i2v":
        kwargs["image"] = tiny_condition_image(kwargs["height"], kwargs["width"])
    kwargs.update(overrides)
    return pipe(**kwargs)[0]


@pytest.mark.parametrize("name", NAMES)
def test_build_call_shape_and_determinism(name: str) -> None:
    pipe = TINY_PIPELINES[name](seed=0)
    assert type(pipe) is EXPECTED_CLASS[name]
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)

    out = _call(pipe, name)
    kw = TINY_CALL_KWARGS[name]
    if name in VIDEO:
        assert tuple(out.shape) == (1, kw["num_frames"], 3, kw["height"], kw["width"])
    else:
        assert tuple(out.shape) == (1, 3, kw["height"], kw["width"])
    assert torch.isfinite(out).all()

    # Same pipeline, same generator seed -> identical output.
    assert torch.equal(out, _call(pipe, name))
    # Rebuilt with the same seed -> identical output.
    assert torch.equal(out, _call(TINY_PIPELINES[name](seed=0), name))


@pytest.mark.parametrize("name", NAMES)
def test_latent_output_and_seed_changes_weights(name: str) -> None:
    pipe = TINY_PIPELINES[name](seed=0)
    latents = _call(pipe, name, output_type="latent")
    channels, spatial, temporal = LATENT_LAYOUT[name]
    kw = TINY_CALL_KWARGS[name]
    hw = (kw["height"] // spatial, kw["width"] // spatial)
    if temporal is None:
        assert tuple(latents.shape) == (1, channels, *hw)
    else:
        assert tuple(latents.shape) == (1, channels, (kw["num_frames"] - 1) // temporal + 1, *hw)
    assert torch.isfinite(latents).all()

    other = TINY_PIPELINES[name](seed=1)
    denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
    a = getattr(pipe, denoiser).state_dict()
    b = getattr(other, denoiser).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_denoiser_has_text_cross_attention(name: str) -> None:
    pipe = TINY_PIPELINES[name](seed=0)
    denoisers = [pipe.unet] if hasattr(pipe, "unet") else [pipe.transformer]
    if getattr(pipe, "transformer_2", None) is not None:
        denoisers.append(pipe.transformer_2)
    for denoiser in denoisers:
        attn2 = [m for n, m in denoiser.named_modules() if n.endswith("attn2")]
        assert attn2, f"{name}: no attn2 cross-attention"
    if name == "tiny-wan-i2v":
        assert all(m.add_k_proj is not None for n, m in pipe.transformer.named_modules() if n.endswith("attn2"))


def test_wan22_uses_both_experts() -> None:
    pipe = tiny_wan22_pipeline(seed=0)
    used: list[str] = []
    pipe.transformer.register_forward_hook(lambda *args: used.append("transformer"))
    pipe.transformer_2.register_forward_hook(lambda *args: used.append("transformer_2"))
    for steps in (2, 4):
        used.clear()
        _call(pipe, "tiny-wan22", output_type="latent", num_inference_steps=steps)
        assert used.count("transformer") > 0 and used.count("transformer_2") > 0, (steps, used)


def test_sana_default_complex_human_instruction() -> None:
    pipe = tiny_sana_pipeline(seed=0)
    out = pipe(
        "a red cat",
        negative_prompt="blurry",
        num_inference_steps=2,
        height=32,
        width=32,
        use_resolution_binning=False,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert tuple(out.shape) == (1, 3, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factory", [tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_gemma_tokenizer])
def test_tokenizers_handle_any_text(factory: Any) -> None:
    tok = factory()
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.unk_token_id is not None
    assert tok.padding_side == "right"
    known = tok("a red cat", add_special_tokens=False).input_ids
    assert len(known) == 3 and tok.unk_token_id not in known
    batch = tok(
        ["a red cat", "Zebra 日本 éé quux!!"],
        padding="max_length",
        max_length=16,
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 16)
    assert int(batch.attention_mask[0].sum()) < 16
    assert tok.batch_decode(batch.input_ids)
    if factory is tiny_t5_tokenizer:
        assert tok.unk_token_id in tok("日本").input_ids
