"""SD1.5 / SDXL ``UNet2DConditionModel``: NAG on every text cross-attention (``attn2``), as the official SDXL code.

Also home of :class:`NAGAttnProcessor2_0`, the NAG version of diffusers' ``AttnProcessor2_0`` (shared with PixArt).
Pooled text and time ids (SDXL ``added_cond_kwargs``) stay positive: the negative enters only through the
cross-attention keys/values, like the official pipeline.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..kernels.cross import nag_cross_attention, sdpa_heads_first
from .base import Adapter, NAGProcessor, register_adapter


class NAGAttnProcessor2_0(NAGProcessor):
    """``AttnProcessor2_0`` with NAG on the cross-attention output (before the output projection)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        packing = self.state.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cfg = self.state.config

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = nag_cross_attention(sdpa_heads_first(attn.heads), query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=2)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_text_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """``attn2`` modules that attend to the text (the official selection: every processor named ``attn2``)."""
    return name.endswith("attn2") and bool(getattr(module, "is_cross_attention", False))


UNET = register_adapter(Adapter(
    family="unet",
    model_class=UNet2DConditionModel,
    processors={AttnProcessor2_0: NAGAttnProcessor2_0},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    timestep_max=999.0,  # official SDXL: NAG off once t < floor((1 - nag_end) * 999)
    window_floor=True,
    preset="sdxl",
    notes="SD1.5/SDXL (incl. DMD2, Lightning, Turbo checkpoints): NAG on every cross-attention attn2",
))
