"""Integration tests of the ComfyUI pack (``comfyui/``) against a real ComfyUI checkout.

Skipped unless ``COMFY_DIR`` points at a ComfyUI source tree (a local export of ComfyUI's public repository, kept
outside this repository; ComfyUI's code is never part of nagkit). Headless CPU recipe: CPU torch, ComfyUI's
requirements minus torch/torchvision/torchaudio (``torchsde einops aiohttp yarl alembic SQLAlchemy av
pydantic-settings``), ``comfy.cli_args.args.cpu = True`` before any other ``comfy`` import, and, when torchvision
cannot be imported, an in-memory stub of ``torchvision.transforms`` while ComfyUI's modules import (``comfy.ldm.cosmos``
imports it at module level; nothing used here calls it).

Tiny random-weight models are built through ComfyUI's own model classes (``comfy.supported_models``) and sampled
through ``comfy.sample`` / ``comfy.samplers`` on CPU. Importing ComfyUI changes process-wide state (logging, torch
settings), so run these tests on their own: ``COMFY_DIR=/path/to/ComfyUI pytest tests/test_comfyui_integration.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

COMFY_DIR = os.environ.get("COMFY_DIR")
pytestmark = pytest.mark.skipif(not COMFY_DIR, reason="set COMFY_DIR to a ComfyUI checkout to run")
PACK = Path(__file__).resolve().parents[1] / "comfyui"
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------- setup
def _import_comfy() -> types.SimpleNamespace:
    sys.path.insert(0, str(Path(COMFY_DIR).resolve()))
    stubbed = False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA wheel beside CPU torch
        import transformers.utils.import_utils as iu

        iu.is_torchvision_available()  # decided (False) before the stub exists
        import diffusers.utils.import_utils  # noqa: F401

        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

        def missing(name: str) -> Any:
            raise AttributeError(f"torchvision stub: transforms.{name}")

        tr.__getattr__ = missing
        tv.transforms = tr
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr
        stubbed = True
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    if os.environ.get("COMFY_PYTORCH_ATTENTION") == "1":  # ComfyUI's --use-pytorch-cross-attention (SDPA on CPU)
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy_api.latest  # noqa: F401
    import comfyui_version
    import nodes

    if stubbed:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    return types.SimpleNamespace(comfy=comfy, nodes=nodes, version=comfyui_version.__version__)


@pytest.fixture(scope="module")
def env() -> Iterator[types.SimpleNamespace]:
    ns = _import_comfy()
    assert asyncio.run(ns.nodes.load_custom_node(str(PACK))), "the pack did not load through ComfyUI's loader"
    module = str(PACK).replace(".", "_x_")
    ns.glue = sys.modules[module + ".glue"]
    ns.NAG = ns.nodes.NODE_CLASS_MAPPINGS["NagkitNAG"]
    ns.NAGGuider = ns.nodes.NODE_CLASS_MAPPINGS["NagkitNAGGuider"]
    yield ns
    _BUILT.clear()  # model patchers detach on deletion: delete them while ComfyUI's modules still exist
    gc.collect()


# --------------------------------------------------------------------------------------------------- models
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
            mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=False)
CHROMA = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=2.0,
              num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
              qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=1)
SD3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32, pos_embed_max_size=8,
           num_patches=64, context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 64, "out_features": 128}},
           pos_embed_scaling_factor=None, input_size=None)
SD35M = dict(SD3, x_block_self_attn=True, x_block_self_attn_layers=[0, 1], qk_norm="rms")
SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
            transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
            context_dim=64, num_heads=2, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None,
            use_temporal_attention=False, use_spatial_transformer=True, legacy=False)
SDXL = dict(SD15, model_channels=64, adm_in_channels=2816, use_linear_in_transformer=True, num_classes="sequential")
WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64, ffn_dim=128,
           freq_dim=32, text_dim=64, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
           cross_attn_norm=True, eps=1e-6)
WAN_I2V = dict(WAN, model_type="i2v", in_dim=36)
QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
            attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))

HIDREAM = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
               num_single_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 64],
               text_emb_dim=32, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[16, 8, 8],
               max_resolution=[32, 32], llama_layers=[0, 1])
HUNYUAN = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
               theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False)


#: family -> (supported_models class name, config, latent shape (no batch), text length, pooled width, extras)
FAMILIES = {
    "flux": ("FluxSchnell", FLUX, (16, 16, 16), 7, 32, {}),
    "chroma": ("Chroma", CHROMA, (16, 16, 16), 7, 32, {}),
    "sd3": ("SD3", SD3, (16, 16, 16), 7, 32, {}),
    "sd35m": ("SD3", SD35M, (16, 16, 16), 7, 32, {}),
    "sd15": ("SD15", SD15, (4, 16, 16), 77, 32, {}),
    "sdxl": ("SDXL", SDXL, (4, 16, 16), 77, 1280, {}),
    "wan_t2v": ("WAN21_T2V", WAN, (16, 3, 8, 8), 16, 32, {}),
    "wan_i2v": ("WAN21_I2V", WAN_I2V, (16, 3, 8, 8), 16, 32, {"clip_vision": True}),
    "qwen": ("QwenImage", QWEN, (16, 1, 8, 8), 7, 32, {}),
    "qwen_edit": ("QwenImage", QWEN, (16, 1, 8, 8), 7, 32, {"reference_latents": (16, 1, 8, 6)}),
    "hunyuan": ("HunyuanVideo", HUNYUAN, (16, 2, 8, 8), 7, 32, {"known_params": True}),
    "hidream": ("HiDream", HIDREAM, (16, 8, 8), 7, 32, {"llama_layers": 2}),
}


class ClipVisionOutput:
    def __init__(self, hidden: torch.Tensor) -> None:
        self.penultimate_hidden_states = hidden


_BUILT: dict[str, Any] = {}


def build(env: types.SimpleNamespace, family: str) -> Any:
    """The family's tiny model as a ModelPatcher (cached per module; tests clone it)."""
    if family not in _BUILT:
        cls, config, *_, extras = FAMILIES[family]
        if extras.get("known_params"):
            config = known_hunyuan_params(config)
        mc = getattr(env.comfy.supported_models, cls)(dict(config))
        mc.set_inference_dtype(torch.float32, None)
        model = mc.get_model({}, device=CPU)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05))
            for name, b in model.diffusion_model.named_buffers():
                if "pos_embed" in name:  # left uninitialised by the model class
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        _BUILT[family] = env.comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    return _BUILT[family]


def known_hunyuan_params(config: dict) -> dict:
    """The HunyuanVideo parameters this ComfyUI version knows (newer versions added byt5/meanflow)."""
    import dataclasses

    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams

    names = {f.name for f in dataclasses.fields(HunyuanVideoParams)} | {"image_model"}
    return {k: v for k, v in config.items() if k in names}


def cond(family: str, seed: int, length: int | None = None) -> list:
    _, config, _, text_len, pooled, extras = FAMILIES[family]
    width = config.get("context_dim") or config.get("context_in_dim") or config.get("text_dim") or 64
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, pooled, generator=g)}
    if extras.get("llama_layers"):  # HiDream: Llama-3 states (1, layers, tokens, width), one more token than T5
        extra["conditioning_llama3"] = torch.randn(1, extras["llama_layers"], (length or text_len) + 1, width,
                                                   generator=torch.Generator().manual_seed(seed + 1000))
    if extras.get("clip_vision"):
        extra["clip_vision_output"] = ClipVisionOutput(torch.randn(1, 257, 1280,
                                                                   generator=torch.Generator().manual_seed(99)))
    if extras.get("reference_latents"):  # Qwen-Image-Edit: a reference image's latent (ReferenceLatent node)
        extra["reference_latents"] = [torch.randn(1, *extras["reference_latents"],
                                                  generator=torch.Generator().manual_seed(98))]
    return [[torch.randn(1, length or text_len, width, generator=g), extra]]


def sample(family: str, model: Any, pos: list, neg: list, cfg: float = 1.0, steps: int = 2, batch: int = 1,
           seed: int = 0, **kw: Any) -> torch.Tensor:
    import comfy.sample

    shape = FAMILIES[family][2]
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros(batch, *shape),
                               seed=seed, disable_pbar=True, **kw)


def settings(env: types.SimpleNamespace, scale: float = 5.0, **kw: Any) -> Any:
    return env.glue.NAGSettings(scale=scale, **kw)


def patch(env: types.SimpleNamespace, model: Any, conditioning: list | None, scale: float = 5.0, **kw: Any) -> Any:
    negative = None if conditioning is None else conditioning[0][0]
    return env.glue.patch_model(model, negative, settings(env, scale, **kw), env.glue.conditioning_extras(conditioning))


def spy(env: types.SimpleNamespace, model: Any) -> tuple[Any, list]:
    """A clone whose innermost APPLY_MODEL wrapper records (cond_or_uncond, guided?, output) per call."""
    model = model.clone()
    seen: list = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, to, **kw):  # noqa: ANN001, ANN202
        out = executor(x, t, c_concat, c_crossattn, control, to, **kw)
        seen.append((list(to.get("cond_or_uncond", [])), env.glue.STATE_KEY in to, out.clone()))
        return out

    model.add_wrapper_with_key(env.glue.APPLY_MODEL, "zz.spy", wrapper)
    return model, seen


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, b.abs().max().item()))


# --------------------------------------------------------------------------------------------------- tests
def test_pack_loads_through_comfyui_loader(env: types.SimpleNamespace) -> None:
    assert env.NAG.__name__ == "NAG" and env.NAGGuider.__name__ == "NAGGuider"
    schema = env.NAG.GET_SCHEMA()
    scale = next(i for i in schema.inputs if i.id == "nag_scale")
    assert "phi + 1" in scale.tooltip and "1 = off" in scale.tooltip
    auto = env.NAG.execute(model=build(env, "sdxl"), nag_scale=1.0, nag_tau=1.0, nag_alpha=0.0, start_percent=0.0,
                           end_percent=1.0, preset="auto").result[0]
    patch_object = auto.get_wrappers(env.glue.APPLY_MODEL, env.glue.WRAPPER_KEY)[0].__self__
    assert (patch_object.settings.scale, patch_object.settings.tau, patch_object.settings.alpha) == (3.0, 2.5, 0.5)
    from comfy_config import config_parser  # what the registry tooling and the loader read from pyproject.toml

    config = config_parser.extract_node_configuration(str(PACK))
    assert config.project.name == "nagkit-nag" and config.tool_comfy.publisher_id
    assert not any(d.lower().startswith("torch") for d in config.project.dependencies)
    print(f"\nComfyUI {env.version} at {COMFY_DIR}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(env: types.SimpleNamespace, family: str) -> None:
    """scale 1 bit-identical; negative == prompt ~ unpatched; a different negative changes the output and stays
    finite at cfg 1 and 3; uncond rows bit-identical in a batched call; the base model untouched."""
    base = build(env, family)
    pos, neg, nag_neg = cond(family, 1), cond(family, 2), cond(family, 3, length=FAMILIES[family][3] - 2)
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in base.model_options.items()}
    weights = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    ref1 = sample(family, base, pos, neg)
    assert torch.equal(sample(family, patch(env, base, nag_neg, scale=1.0), pos, neg), ref1)
    assert _close(sample(family, patch(env, base, pos), pos, neg), ref1, 1e-4)
    patched = patch(env, base, nag_neg)
    out1 = sample(family, patched, pos, neg)
    assert torch.isfinite(out1).all() and (out1 - ref1).abs().max() > 1e-3
    plain, seen_plain = spy(env, base)
    ref3 = sample(family, plain, pos, neg, cfg=3.0)
    guided, seen = spy(env, patched)
    out3 = sample(family, guided, pos, neg, cfg=3.0)
    assert torch.isfinite(out3).all() and (out3 - ref3).abs().max() > 1e-3
    (cou, was_guided, first), (_, _, first_ref) = seen[0], seen_plain[0]
    assert cou == [1, 0] and was_guided  # cond and uncond batched together, uncond first
    assert torch.equal(first[:1], first_ref[:1])  # uncond rows untouched, bit for bit
    assert not torch.equal(first[1:], first_ref[1:])
    assert base.model_options.keys() == options.keys()
    assert base.model_options["transformer_options"] == options["transformer_options"]
    assert all(torch.equal(v, weights[k]) for k, v in base.model.diffusion_model.state_dict().items())
    assert torch.equal(sample(family, base, pos, neg), ref1)


@pytest.mark.parametrize("family", ["flux", "sd15", "wan_t2v", "qwen_edit", "hunyuan", "hidream"])
def test_latent_batch_two(env: types.SimpleNamespace, family: str) -> None:
    base = build(env, family)
    pos, neg, nag_neg = cond(family, 1), cond(family, 2), cond(family, 3, length=5)
    patched = patch(env, base, nag_neg)
    both = sample(family, patched, pos, neg, cfg=3.0, batch=2, seed=4)
    assert torch.isfinite(both).all()
    noise = torch.randn(2, *FAMILIES[family][2], generator=torch.Generator().manual_seed(4))
    import comfy.sample

    for row in range(2):
        alone = comfy.sample.sample(patched, noise[row:row + 1], 2, 3.0, "euler", "simple", pos, neg,
                                    torch.zeros(1, *FAMILIES[family][2]), seed=4, disable_pbar=True)
        assert _close(both[row:row + 1], alone, 1e-4)


def test_start_end_window(env: types.SimpleNamespace) -> None:
    import comfy.samplers

    base = build(env, "flux")
    pos, neg, nag_neg = cond("flux", 1), cond("flux", 2), cond("flux", 3, length=5)
    sampling = base.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 4)[:-1]
    for start, end in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0)):
        node = env.NAG.execute(model=base, nag_negative=nag_neg, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25,
                               start_percent=start, end_percent=end).result[0]
        lo, hi = env.glue.percent_window(base, start, end)[::-1]
        expected = sum(1 for s in sigmas.tolist() if lo <= s <= hi)
        model, seen = spy(env, node)
        sample("flux", model, pos, neg, steps=4)
        assert len(seen) == 4 and sum(guided for _, guided, _ in seen) == expected
        assert expected == 4 if (start, end) == (0.0, 1.0) else 0 < expected < 4


@pytest.mark.parametrize("family", ["flux", "sd15", "wan_t2v", "sd3", "qwen", "hunyuan", "hidream"])
def test_previous_attention_override_still_called(env: types.SimpleNamespace, family: str) -> None:
    base = build(env, family)
    pos, neg, nag_neg = cond(family, 1), cond(family, 2), cond(family, 3, length=5)
    calls = []

    def counting(func, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(1)
        return func(*args, **kwargs)

    other = base.clone()
    other.model_options["transformer_options"][env.glue.OVERRIDE] = counting
    out = sample(family, patch(env, other, nag_neg), pos, neg)
    assert calls
    assert _close(out, sample(family, patch(env, base, nag_neg, attention="comfy"), pos, neg), 1e-4)


def test_samplers_and_guider(env: types.SimpleNamespace) -> None:
    """KSampler, KSamplerAdvanced (start/last step), SamplerCustom and the NAG Guider (SamplerCustomAdvanced's
    path) give the same result on the same schedule; the guider reuses its negative when no NAG negative is
    connected."""
    import comfy.sample
    import comfy.samplers

    base = build(env, "flux")
    pos, neg, nag_neg = cond("flux", 1), cond("flux", 2), cond("flux", 3, length=5)
    shape = FAMILIES["flux"][2]
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros(1, *shape)
    node = env.NAG.execute(model=base, nag_negative=nag_neg, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25,
                           start_percent=0.0, end_percent=1.0).result[0]
    ksampler = comfy.sample.sample(node, noise, 3, 1.0, "euler", "simple", pos, neg, latent, seed=0,
                                   disable_pbar=True)
    advanced = comfy.sample.sample(node, noise, 3, 1.0, "euler", "simple", pos, neg, latent, start_step=0,
                                   last_step=10000, force_full_denoise=True, seed=0, disable_pbar=True)
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "simple", 3)
    sampler = comfy.samplers.sampler_object("euler")
    custom = comfy.sample.sample_custom(node, noise, 1.0, sampler, sigmas, pos, neg, latent, seed=0,
                                        disable_pbar=True)
    guider = env.NAGGuider.execute(model=base, positive=pos, negative=neg, nag_negative=nag_neg, cfg=1.0,
                                   nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, start_percent=0.0,
                                   end_percent=1.0).result[0]
    guided = guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0)
    assert torch.equal(ksampler, advanced)
    assert _close(custom, ksampler, 1e-6) and _close(guided, ksampler, 1e-6)
    reuse = env.NAGGuider.execute(model=base, positive=pos, negative=nag_neg, cfg=1.0, nag_scale=5.0, nag_tau=2.5,
                                  nag_alpha=0.25, start_percent=0.0, end_percent=1.0).result[0]
    assert _close(reuse.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0), ksampler, 1e-6)
    reuse_node = env.NAG.execute(model=base, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, start_percent=0.0,
                                 end_percent=1.0).result[0]
    assert torch.equal(sample("flux", reuse_node, pos, nag_neg, steps=3), ksampler)


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_never_silently_off(env: types.SimpleNamespace, family: str) -> None:
    base = build(env, family)
    pos, neg, nag_neg = cond(family, 1), cond(family, 2), cond(family, 3, length=5)
    broken = patch(env, base, nag_neg).clone()
    to = broken.model_options["transformer_options"]
    to.pop("patches_replace", None)  # as if this ComfyUI ignored the block patches
    to.pop("patches", None)
    with pytest.raises(env.glue.NAGNotApplied) as err:
        sample(family, broken, pos, neg)
    message = str(err.value)
    assert type(base.model.diffusion_model).__name__ in message and f"ComfyUI {env.version}" in message


def test_unsupported_model_is_refused_at_node_execution(env: types.SimpleNamespace) -> None:
    base = build(env, "flux").clone()
    base.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(env.glue.NAGUnsupportedModel, match="Supported families"):
        env.NAG.execute(model=base, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, start_percent=0.0, end_percent=1.0)


@pytest.mark.parametrize(("cls", "config", "reason"), [
    ("Lumina2", {"image_model": "lumina2"}, "Lumina2"),
])
def test_refused_families_get_a_clear_error(env: types.SimpleNamespace, cls: str, config: dict, reason: str) -> None:
    """Families without a NAG path in this pack are refused by name (built on the meta device: no weights)."""
    mc = getattr(env.comfy.supported_models, cls)(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        model = mc.get_model({}, device=torch.device("meta"))
    with pytest.raises(env.glue.NAGUnsupportedModel, match=f"{reason}.*Supported families"):
        env.glue.detect_family(model.diffusion_model)


@pytest.mark.parametrize("family", ["qwen", "qwen_edit"])
def test_qwen_negative_text_positions_are_the_prompts(env: types.SimpleNamespace, family: str) -> None:
    """The RoPE rows NAG gives a negative of 9 tokens are the rows ComfyUI's Qwen-Image builds for a 9-token prompt
    (captured from the model's own block arguments), and negative == prompt is ~ unpatched with Edit's reference
    latents in the image stream."""
    base = build(env, family)
    seen = []

    def capture(args, extra):  # noqa: ANN001, ANN202
        seen.append((args["pe"].clone(), args["txt"].shape[1], args["img"].shape[1]))
        return extra["original_block"](args)

    probe = base.clone()
    probe.set_model_patch_replace(capture, "dit", "double_block", 0)
    pos, neg = cond(family, 1, length=9), cond(family, 2)
    sample(family, probe, pos, neg, steps=1)
    pe, lp, li = seen[0]
    assert lp == 9 and li == (16 + 12 if family == "qwen_edit" else 16)  # Edit: 4x4 generated + 4x3 reference
    shape = (1, *FAMILIES[family][2])
    ours = env.glue._qwen_text_pe(base.model.diffusion_model, shape, 9, pe.shape[0], pe.device, pe.dtype)
    assert torch.equal(ours, pe[:, :9])
    pos = cond(family, 1)
    ref = sample(family, base, pos, neg)
    assert _close(sample(family, patch(env, base, pos), pos, neg), ref, 1e-4)
    longer = sample(family, patch(env, base, cond(family, 3, length=11)), pos, neg)
    assert torch.isfinite(longer).all() and (longer - ref).abs().max() > 1e-3


def test_unbatched_cond_and_uncond(env: types.SimpleNamespace) -> None:
    """A CFG negative of another length is sampled in its own call: the prompt's call is guided, the negative's is
    the unpatched one."""
    base = build(env, "flux")
    pos, neg, nag_neg = cond("flux", 1), cond("flux", 2, length=9), cond("flux", 3, length=5)
    plain, seen_plain = spy(env, base)
    sample("flux", plain, pos, neg, cfg=3.0, steps=1)
    guided, seen = spy(env, patch(env, base, nag_neg))
    out = sample("flux", guided, pos, neg, cfg=3.0, steps=1)
    assert torch.isfinite(out).all()
    assert sorted(c for c, _, _ in seen) == [[0], [1]]
    for (cou, was_guided, output), (cou_ref, _, ref) in zip(seen, seen_plain, strict=True):
        assert cou == cou_ref and was_guided == (cou == [0])
        assert torch.equal(output, ref) if cou == [1] else not torch.equal(output, ref)


def test_example_workflows_match_node_definitions(env: types.SimpleNamespace) -> None:
    nodes = env.nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False))
    for path in sorted((PACK / "examples").glob("*.json")):
        graph = json.loads(path.read_text())
        for node_id, node in graph.items():
            cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:  # an extras module this headless environment cannot import (e.g. needs torchvision)
                source = "\n".join(p.read_text() for p in (Path(COMFY_DIR) / "comfy_extras").glob("*.py"))
                assert f"class {node['class_type']}" in source, (path.name, node["class_type"])
                continue
            spec = cls.INPUT_TYPES()
            known = {**spec.get("required", {}), **spec.get("optional", {})}
            for name in node["inputs"]:
                assert name in known, (path.name, node_id, node["class_type"], name)
            for name in spec.get("required", {}):
                assert name in node["inputs"], (path.name, node_id, node["class_type"], name)


def test_windows_convert_through_model_sampling(env: types.SimpleNamespace) -> None:
    base = build(env, "sd15")
    start, end = env.glue.percent_window(base, 0.2, 0.8)
    sampling = base.get_model_object("model_sampling")
    assert math.isclose(start, sampling.percent_to_sigma(0.2)) and math.isclose(end, sampling.percent_to_sigma(0.8))


# --------------------------------------------------------------------------------------------------- cost
COST_FLUX = dict(FLUX, vec_in_dim=64, context_in_dim=256, hidden_size=512, mlp_ratio=4.0, num_heads=8, depth=2,
                 depth_single_blocks=4, axes_dim=[8, 28, 28])
#: mid HiDream-like: hidden 512 (8 heads x 64), 2 dual + 4 single blocks, 4 routed experts (2 active) + a shared one
COST_HIDREAM = dict(HIDREAM, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                    caption_channels=[256, 256], text_emb_dim=64, axes_dims_rope=[32, 16, 16],
                    max_resolution=[128, 128], llama_layers=[0, 1, 2, 3, 3, 3])


def _cost_table(env: types.SimpleNamespace, cls: str, config: dict, shape: tuple, conditioning: Any,
                label: str) -> dict:
    """Per-step CPU time and FLOPs through ComfyUI: plain cfg 1, CFG, NAG at cfg 1 (both attention paths), NAG + CFG.
    One thread; CPU time (``time.process_time``), the minimum over interleaved rounds (``NAGKIT_COST_ROUNDS``)."""
    import statistics
    import time

    import comfy.ldm.modules.attention as attention
    import comfy.sample
    from torch.utils.flop_counter import FlopCounterMode

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mc = getattr(env.comfy.supported_models, cls)(dict(config))
        mc.set_inference_dtype(torch.float32, None)
        model = mc.get_model({}, device=CPU)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.02))
        base = env.comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
        pos, neg, nag_neg = conditioning(1), conditioning(2), conditioning(3)
        runs = {
            "plain, cfg 1": (base, 1.0),
            "CFG 3.5": (base, 3.5),
            "NAG, cfg 1 (attention auto)": (patch(env, base, nag_neg), 1.0),
            "NAG, cfg 1 (attention comfy)": (patch(env, base, nag_neg, attention="comfy"), 1.0),
            "NAG + CFG 3.5": (patch(env, base, nag_neg), 3.5),
        }
        steps = 3
        noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))

        def run(m: Any, cfg: float, n: int = steps) -> None:
            comfy.sample.sample(m, noise, n, cfg, "euler", "simple", pos, neg, torch.zeros(1, *shape), seed=0,
                                disable_pbar=True)

        def sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
            return 4 * q[0] * q[1] * q[2] * k[2] * q[3]

        flops = {}
        for name, (m, cfg) in runs.items():
            mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                run(m, cfg, 1)
            flops[name] = counter.get_total_flops()
        for m, cfg in runs.values():
            run(m, cfg)  # warm-up (and nagkit's compiled combination)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(int(os.environ.get("NAGKIT_COST_ROUNDS", "5"))):
            for name, (m, cfg) in runs.items():
                start = time.process_time()
                run(m, cfg)
                times[name].append((time.process_time() - start) / steps)
    finally:
        torch.set_num_threads(threads)
    base_time, base_flops = min(times["plain, cfg 1"]), flops["plain, cfg 1"]
    print(f"\n{label}: ComfyUI {env.version}, attention {attention.optimized_attention.__name__}, 1 thread")
    print("| configuration | CPU ms/step (min) | median | time | FLOPs |\n|---|---|---|---|---|")
    for name in runs:
        t = times[name]
        print(f"| {name} | {1e3 * min(t):.0f} | {1e3 * statistics.median(t):.0f} | "
              f"{100 * (min(t) / base_time - 1):+.1f} % | {100 * (flops[name] / base_flops - 1):+.1f} % |")
    return {name: flops[name] / base_flops - 1 for name in runs}


@pytest.mark.bench
def test_cost_table(env: types.SimpleNamespace) -> None:
    """A mid FLUX-like model (hidden 512, 8 heads, 2 double + 4 single blocks) at FLUX's text/image token ratio (576
    image tokens, 72 prompt and 72 negative tokens; FLUX.1 at 1024²: 4096 / 512 / 512).
    ``NAGKIT_BENCH=1 COMFY_PYTORCH_ATTENTION=1``."""

    def conditioning(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 72, 256, generator=gen), {"pooled_output": torch.randn(1, 64, generator=gen)}]]

    overhead = _cost_table(env, "FluxSchnell", COST_FLUX, (16, 48, 48), conditioning, "FLUX-like")
    assert overhead["NAG, cfg 1 (attention auto)"] < 0.15


@pytest.mark.bench
def test_cost_table_hidream(env: types.SimpleNamespace) -> None:
    """A mid HiDream-like model (hidden 512, 8 heads, 2 dual + 4 single blocks, mixture-of-experts feed-forward) at
    HiDream-I1's text/image token ratio (576 image tokens, 18 T5 + 18 Llama-3 tokens for the prompt and for the
    negative; HiDream-I1 at 1024²: 4096 image tokens, 128 T5 + 128 Llama). ``NAGKIT_BENCH=1``."""

    def conditioning(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 18, 256, generator=gen), {
            "pooled_output": torch.randn(1, 64, generator=gen),
            "conditioning_llama3": torch.randn(1, 4, 18, 256, generator=gen)}]]

    overhead = _cost_table(env, "HiDream", COST_HIDREAM, (16, 48, 48), conditioning, "HiDream-like")
    assert overhead["NAG, cfg 1 (attention auto)"] < 0.5
