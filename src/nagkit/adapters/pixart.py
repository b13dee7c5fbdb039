"""PixArt-α/Σ ``PixArtTransformer2DModel``: T5 cross-attention (``attn2``) with a text padding mask."""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from .base import Adapter, register_adapter
from .unet import CLASSIC_PROCESSORS, is_text_cross_attention

PIXART = register_adapter(Adapter(
    family="pixart",
    model_class=PixArtTransformer2DModel,
    processors={k: CLASSIC_PROCESSORS[k] for k in (AttnProcessor2_0, AttnProcessor, FusedAttnProcessor2_0)},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    preset="pixart",
    notes="PixArt-α/Σ: NAG on every cross-attention attn2; the negative keeps its own padding mask",
))
