"""Sana ``SanaTransformer2DModel``: linear self-attention plus a Gemma-text cross-attention ``attn2`` (guided)."""

from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

from ..kernels.cross import nag_cross_attention, sdpa_heads_first
from .base import Adapter, NAGProcessor, register_adapter
from .unet import is_text_cross_attention


class NAGSanaAttnProcessor2_0(NAGProcessor):
    """``SanaAttnProcessor2_0`` with NAG on the cross-attention output."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        cfg = self.state.config

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        hidden_states = nag_cross_attention(sdpa_heads_first(attn.heads), query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=2)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor


SANA = register_adapter(Adapter(
    family="sana",
    model_class=SanaTransformer2DModel,
    processors={SanaAttnProcessor2_0: NAGSanaAttnProcessor2_0},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    preset="sana",
    notes="Sana: NAG on every cross-attention attn2 (self-attention is linear and untouched)",
))
