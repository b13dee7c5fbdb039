"""SANA-Video ``SanaVideoTransformer3DModel``: linear self-attention plus a Gemma-text cross-attention ``attn2``.

Like Sana: NAG on every ``transformer_blocks.*.attn2`` (its own ``SanaAttnProcessor2_0`` class, a different object
from Sana's), the text mask is packed with the negative's and the tokens every row masks out are dropped. The
self-attention (linear, ``SanaLinearAttnProcessor3_0``) is untouched. Image-to-video (``SanaImageVideoPipeline``):
the conditioning frame is a latent of the video stream (per-frame timesteps ``(B, F)``, 0 on the conditioning frame),
never a text key, so it is never negated; the ``start``/``end`` window reads the largest timestep of the call.

The family's file: the NAG processor and the adapter; the pipelines (``SanaVideoPipeline``,
``SanaImageToVideoPipeline``) and preset (``sana-video``); the meta inputs of ``nagkit bench``; the tiny pipeline
``tiny-sana-video``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import SanaVideoTransformer3DModel
from diffusers.models.transformers.transformer_sana_video import SanaAttnProcessor2_0 as SanaVideoAttnProcessor2_0

from ..core.config import NAGConfig
from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .sana import NAGSanaAttnProcessor2_0
from .unet import is_text_cross_attention

if TYPE_CHECKING:
    from diffusers import SanaVideoPipeline

    from ..bench.families import FamilySpec, Inputs


class NAGSanaVideoAttnProcessor2_0(NAGSanaAttnProcessor2_0):
    """SANA-Video's ``SanaAttnProcessor2_0`` with NAG on the cross-attention output.

    The same computation as Sana's processor (query/key RMS norms, additive mask, ``to_out``, division by
    ``rescale_output_factor``); only the wrapped class differs.
    """


# ------------------------------------------------------------------------------------------------ nagkit bench
def sanavideo_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one SANA-Video call: the video latents ``(B, C, F, H, W)`` and the text mask."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, g.latent_frames or 1, h, w),
                              "timestep": c.timestep, "encoder_hidden_states": c.text}
    negative = c.negative
    if g.mask:
        kwargs["encoder_attention_mask"] = c.meta(batch, g.text_tokens, dtype=torch.long)
        negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
def tiny_sana_video_pipeline(seed: int = 0) -> SanaVideoPipeline:
    """Build a tiny random SANA-Video text-to-video pipeline.

    Transformer: 1 block, 2 heads x 8 (linear self-attention, ``attn2`` cross-attention to the text), patch (1, 2, 2);
    Gemma2 text encoder (2 layers, hidden 16); the tiny Wan VAE (z_dim 16, spatial 8, temporal 4); flow-match
    Euler scheduler. Call it with ``use_resolution_binning=False`` and a short ``max_sequence_length``.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``SanaVideoPipeline`` on CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaVideoPipeline

    from ..tiny.pipelines import _finish, tiny_gemma_encoder
    from .wan import _tiny_wan_vae

    tokenizer, text_encoder = tiny_gemma_encoder(seed)
    torch.manual_seed(seed)
    transformer = SanaVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text_encoder.config.hidden_size,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=32,
    ).eval()
    vae = _tiny_wan_vae(seed)
    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
# SANA-Video encodes its CFG negative without the complex human instruction; so does the NAG negative.
_SANA_VIDEO = PipelineSpec(denoisers=("transformer",), mask_index=1, overrides={"complex_human_instruction": False},
                           preset="sana-video", count_arg="num_videos_per_prompt",
                           embeds_args={"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"})

SANA_VIDEO = register_adapter(Adapter(
    drop_padding=True,
    family="sanavideo",
    model_class=SanaVideoTransformer3DModel,
    processors={SanaVideoAttnProcessor2_0: NAGSanaVideoAttnProcessor2_0},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    preset="sana-video",
    official=False,
    notes="SANA-Video T2V/I2V: NAG on every cross-attention attn2 (self-attention is linear and untouched); "
          "the I2V conditioning frame is a video latent, never negated",
    pipelines={"SanaVideoPipeline": _SANA_VIDEO, "SanaImageToVideoPipeline": _SANA_VIDEO},
    # No published NAG values for SANA-Video: the Sana preset (paper Table 5, SANA: phi=4, alpha=0.375), by analogy.
    presets={"sana-video": NAGConfig(scale=5.0, tau=2.5, alpha=0.375)},
    tiny={
        "tiny-sana-video": TinyModel(tiny_sana_video_pipeline, {"height": 32, "width": 32, "frames": 5,
                                                                "use_resolution_binning": False,
                                                                "max_sequence_length": 32}),
    },
    bench_inputs=sanavideo_bench_inputs,
))
