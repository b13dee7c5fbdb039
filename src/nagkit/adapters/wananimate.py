"""Wan Animate ``WanAnimateTransformer3DModel`` and ``WanAnimatePipeline``: NAG on the text cross-attention ``attn2``.

The Animate model carries its own copies of ``WanAttention`` / ``WanAttnProcessor`` (same computation as Wan's:
``[image context | text]`` with the CLIP image context through ``add_k_proj``), so the Wan NAG processor applies: NAG
on the text attention output, the image-context attention added afterwards (never negated). ``face_adapter`` blocks
cross-attend to motion features, not to text: they are not guided (the selector takes ``*.attn2`` modules only).

``WanAnimatePipeline`` (animate and replace modes): its ``encode_prompt`` is Wan's (UMT5, padded to
``max_sequence_length``), so the NAG negative is encoded like the pipeline's CFG negative. The pipeline makes one
conditional call (``cache_context("cond")``: guided) and, with CFG, one unconditional call per step
(``cache_context("uncond")``, the CFG negative text and a blanked face video: never guided). The conditioning — the
reference image's CLIP tokens, its VAE latents, the pose latents, the face video — is the same in ``Z+`` and ``Z-``
(only the text inside ``attn2`` differs), so it is never negated. Long videos run as several segments, each its own
denoising loop: every conditional call is guided with the same negative.

The tiny pipeline ``tiny-wan-animate`` needs ``image``, ``pose_video`` and ``face_video``: see
:func:`tiny_animate_inputs`. The command line cannot give pose and face videos, so ``nagkit generate`` refuses
``WanAnimatePipeline`` models with a one-line error; use the Python API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor

from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .wan import NAGWanAttnProcessor, _wan_text_attention

if TYPE_CHECKING:
    from diffusers import WanAnimatePipeline
    from PIL import Image


class NAGWanAnimateAttnProcessor(NAGWanAttnProcessor):
    """Wan Animate's own ``WanAttnProcessor`` copy with NAG on the text cross-attention output (same computation)."""


# ------------------------------------------------------------------------------------------------ tiny pipeline
#: Face video side (the tiny transformer's ``motion_encoder_size``; the pipeline resizes the face video to it).
TINY_FACE_SIZE = 16


def tiny_wan_animate_transformer(seed: int = 0, text_dim: int = 16, image_dim: int = 8) -> WanAnimateTransformer3DModel:
    """2 blocks, 2 heads x 8, image-context K/V in ``attn2`` (``added_kv_proj_dim`` = inner dim, as the published
    model), 16 latent channels (``in_channels`` 2·16 + 4), a face adapter after every block, motion encoder for
    16x16 faces."""
    torch.manual_seed(seed)
    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, image_dim=image_dim,
        added_kv_proj_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
        motion_encoder_size=TINY_FACE_SIZE, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
        face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=1,
    ).eval()


def tiny_wan_animate_pipeline(seed: int = 0) -> WanAnimatePipeline:
    """Build a tiny random ``WanAnimatePipeline``.

    UMT5 text encoder and tokenizer, Wan VAE and UniPC scheduler as the tiny Wan pipeline; CLIP vision encoder (2
    layers, width 8, 32x32 input, patch 8: 17 tokens; the pipeline takes its second-to-last hidden states) with a
    32x32 image processor; transformer as :func:`tiny_wan_animate_transformer`. Call it with
    :func:`tiny_animate_inputs` (reference image, pose and face videos) and ``segment_frame_length=5``; keep
    ``max_sequence_length=512`` (the attention processor splits the image context from the text at 512 tokens).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``WanAnimatePipeline`` on CPU in float32.
    """
    from diffusers import WanAnimatePipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from ..tiny.pipelines import _finish
    from .wan import _tiny_umt5, _tiny_wan_vae, _wan_scheduler
    from .wanvace import _ensure_prompt_clean

    _ensure_prompt_clean("diffusers.pipelines.wan.pipeline_wan_animate")
    tokenizer, text_encoder = _tiny_umt5(seed)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        image_size=32, patch_size=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = tiny_wan_animate_transformer(seed, text_dim=text_encoder.config.d_model,
                                               image_dim=image_encoder.config.hidden_size)
    pipe = WanAnimatePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_wan_vae(seed),
                              scheduler=_wan_scheduler(), image_processor=image_processor,
                              image_encoder=image_encoder, transformer=transformer)
    return _finish(pipe)


def tiny_animate_inputs(frames: int = 5, height: int = 32, width: int = 32, seed: int = 0
                        ) -> dict[str, Image.Image | list[Image.Image]]:
    """Deterministic conditioning for ``tiny-wan-animate``: ``image`` (the character), ``pose_video`` (``frames``
    frames of ``height x width``) and ``face_video`` (``frames`` frames of 16x16)."""
    from ..tiny.pipelines import tiny_condition_image

    return {"image": tiny_condition_image(height, width, seed),
            "pose_video": [tiny_condition_image(height, width, seed + 1 + i) for i in range(frames)],
            "face_video": [tiny_condition_image(TINY_FACE_SIZE, TINY_FACE_SIZE, seed + 101 + i)
                           for i in range(frames)]}


# ------------------------------------------------------------------------------------------------ registration
# Wan's encode_prompt (prompt, negative_prompt, do_classifier_free_guidance, num_videos_per_prompt, …) -> (embeds,
# negative embeds); the reference image is required (no default in the call's signature).
_ANIMATE = PipelineSpec(denoisers=("transformer",), count_arg="num_videos_per_prompt", preset="wan", size_multiple=2,
                        requires_image=True)

_CALL: dict[str, Any] = {"height": 32, "width": 32, "segment_frame_length": 5}

WAN_ANIMATE = register_adapter(Adapter(
    family="wananimate",
    model_class=WanAnimateTransformer3DModel,
    processors={WanAnimateAttnProcessor: NAGWanAnimateAttnProcessor},
    select=_wan_text_attention,
    mask_arg=None,
    # The Wan presets (Wan Animate is a Wan 2.1-based 14B model; no published NAG values for it).
    preset="wan",
    official=False,
    notes="Wan Animate: NAG on the text cross-attention attn2; reference image (CLIP context, latents), pose and "
          "face conditioning never negated; face_adapter (motion features) untouched",
    pipelines={"WanAnimatePipeline": _ANIMATE},
    # also needs image=, pose_video=, face_video= (tiny_animate_inputs)
    tiny={"tiny-wan-animate": TinyModel(tiny_wan_animate_pipeline, _CALL)},
    separate_cfg=True,  # cond / uncond calls in turn (the uncond call blanks the face video)
))
