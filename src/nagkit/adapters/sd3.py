"""SD3 / SD3.5 ``SD3Transformer2DModel``: joint attention (image-first ``[I | Tp | Tn]``) with NAG on the image tokens.

The negative text is packed after the prompt's text, so it runs through every block as its own stream, modulated with
the prompt's pooled embedding — exactly the official SD3 NAG pipeline (its NAG row reuses the positive pooled
embedding). SD3.5-Medium's extra image-only self-attention (``attn2`` of the dual-attention blocks) is not touched.
Both NAG modes are the same computation here.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, register_adapter


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class NAGJointAttnProcessor2_0(NAGProcessor):
    """``JointAttnProcessor2_0`` with NAG on the image tokens and the negative text as a separate stream."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        cfg = self.state.config
        batch, image_len = hidden_states.shape[:2]

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(hidden_states), batch, attn.heads)
        value = _heads(attn.to_v(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads)
        text_k = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads)
        text_v = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads)
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query = torch.cat([query, text_q], dim=2)
        key = torch.cat([key, text_k], dim=2)
        value = torch.cat([value, text_v], dim=2)

        out = nag_joint_attention(query, key, value, packing, text_first=False, scale=cfg.scale, tau=cfg.tau,
                                  alpha=cfg.alpha, norm=cfg.norm, backend="native")  # as the original: F.sdpa
        hidden_states, encoder_hidden_states = out[:, :image_len], out[:, image_len:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def _joint_text_attention(name: str, module: torch.nn.Module) -> bool:
    return getattr(module, "add_q_proj", None) is not None  # the joint attention; not SD3.5's image-only attn2


SD3 = register_adapter(Adapter(
    family="sd3",
    model_class=SD3Transformer2DModel,
    processors={JointAttnProcessor2_0: NAGJointAttnProcessor2_0},
    select=_joint_text_attention,
    mask_arg=None,
    preset="sd3",
    notes="SD3/SD3.5: NAG on the image tokens of every joint attention; the negative text is its own stream "
          "(positive pooled modulation, as official); image->image attention computed once (LSE merge)",
))
