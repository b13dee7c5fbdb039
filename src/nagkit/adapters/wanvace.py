"""Wan VACE ``WanVACETransformer3DModel``: NAG on the text cross-attention ``attn2`` of the main blocks *and* of the
VACE control blocks.

Decision for the VACE control blocks (``vace_blocks.*.attn2``): they run the same ``WanAttnProcessor`` over the
control stream (video-space tokens: the control latents plus the video tokens) against the same text, and their
outputs are added to the video tokens as hints. They get the same NAG as the main blocks (``Z+`` with the prompt,
``Z-`` with the NAG negative, combined per token): a processor that saw the packed ``[prompt | negative]`` text without
NAG would attend to the negative as if it were prompt text, and keeping them prompt-only would let the hints pull
towards what the main blocks steer away from. So every attention where text conditions video-space tokens is guided,
as in the main blocks; the control stream is never duplicated (one stream, two text attentions per guided layer).

Image context (I2V-style ``encoder_hidden_states_image``, when a VACE checkpoint has one) is not negated: NAG acts on
the text attention and the image-context attention is added afterwards (``NAGWanAttnProcessor``).

The family's file: the adapter (it reuses ``NAGWanAttnProcessor``: the VACE model imports ``WanAttnProcessor`` from
``transformer_wan``); the pipeline (``WanVACEPipeline``, incl. Wan 2.2 VACE with ``transformer_2``) and preset (the
Wan presets); the meta inputs of ``nagkit bench``; the tiny pipeline ``tiny-wan-vace``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import WanVACETransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .wan import NAGWanAttnProcessor, _tiny_umt5, _tiny_wan_vae, _wan_scheduler, _wan_text_attention

if TYPE_CHECKING:
    from diffusers import WanVACEPipeline

    from ..bench.families import FamilySpec, Inputs


# ------------------------------------------------------------------------------------------------ nagkit bench
def wanvace_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Wan VACE call: video latents, text and the control latents (``vace_in_channels``)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    frames = g.latent_frames or 1
    vace_in = spec.config.get("vace_in_channels", 96)
    layers = len(spec.config.get("vace_layers", [0, 5, 10, 15, 20, 25, 30, 35]))
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, frames, h, w),
                              "timestep": c.timestep, "encoder_hidden_states": c.text,
                              "control_hidden_states": c.meta(batch, vace_in, frames, h, w),
                              "control_hidden_states_scale": c.meta(layers)}
    return Inputs(kwargs=kwargs, negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
def _ensure_prompt_clean(module_name: str) -> None:
    """Give a Wan pipeline module that uses ``ftfy`` without having imported it (ftfy not installed) an identity
    ``ftfy.fix_text`` (the module-level name only), as ``nagkit.adapters.wan`` does for the I2V module."""
    import importlib
    import types

    module = importlib.import_module(module_name)
    if not hasattr(module, "ftfy"):
        shim = types.ModuleType("ftfy_identity_shim")
        shim.fix_text = lambda text: text  # type: ignore[attr-defined]
        module.ftfy = shim  # type: ignore[attr-defined]


def tiny_wan_vace_pipeline(seed: int = 0) -> WanVACEPipeline:
    """Build a tiny random Wan VACE pipeline.

    Transformer: 2 blocks, 2 heads x 8, VACE control blocks at layers (0, 1), ``vace_in_channels=96`` (the
    pipeline's 16 + 16 latent channels + 64 mask channels of the spatial factor 8 VAE); UMT5 text encoder (1 layer);
    the tiny Wan VAE; UniPC flow scheduler (shift 3). Called without ``video``/``mask`` it generates from text with an
    empty control video.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``WanVACEPipeline`` on CPU in float32.
    """
    from diffusers import WanVACEPipeline

    from ..tiny.pipelines import _finish

    _ensure_prompt_clean("diffusers.pipelines.wan.pipeline_wan_vace")
    tokenizer, text_encoder = _tiny_umt5(seed)
    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=text_encoder.config.d_model, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=96,
    ).eval()
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_wan_vae(seed),
                           scheduler=_wan_scheduler(), transformer=transformer)
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
WAN_VACE = register_adapter(Adapter(
    family="wanvace",
    model_class=WanVACETransformer3DModel,
    processors={WanAttnProcessor: NAGWanAttnProcessor},
    # blocks.*.attn2 and vace_blocks.*.attn2: both attend to the text (see the module docstring)
    select=_wan_text_attention,
    mask_arg=None,
    preset="wan",
    official=False,
    notes="Wan VACE: NAG on the text cross-attention attn2 of the main blocks and of the VACE control blocks",
    pipelines={
        # conditional and unconditional calls in turn; Wan 2.2 VACE: transformer_2 below boundary_ratio
        "WanVACEPipeline": PipelineSpec(denoisers=("transformer", "transformer_2"), count_arg="num_videos_per_prompt",
                                        preset="wan", size_multiple=2),
    },
    # the Wan presets ("wan", "wan-causvid") are registered by nagkit.adapters.wan: no VACE-specific values exist
    tiny={"tiny-wan-vace": TinyModel(tiny_wan_vace_pipeline, {"height": 32, "width": 32, "num_frames": 5})},
    bench_inputs=wanvace_bench_inputs,
    separate_cfg=True,
))
