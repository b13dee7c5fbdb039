"""Wan 2.1 / 2.2 ``WanTransformer3DModel`` (T2V, I2V, TI2V): NAG on the text cross-attention ``attn2``.

I2V: the image-context tokens (CLIP, 257 per frame reference) are not negated. NAG acts on the text attention output
and the image-context attention is added afterwards, as in the official Wan processor.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..kernels.cross import nag_cross_attention
from .base import Adapter, NAGProcessor, register_adapter


class NAGWanAttnProcessor(NAGProcessor):
    """``WanAttnProcessor`` with NAG on the text cross-attention output."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cfg = self.state.config
        backend = self._attention_backend

        # [image context | positive text | negative text]: the text length is known exactly here.
        context_img, n_img = None, encoder_hidden_states.shape[1] - packing.lp - packing.ln
        if attn.add_k_proj is not None:  # I2V: the image context has its own K/V projections
            context_img = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
            n_img = 0
        # else (``image_dim`` without ``added_kv_proj_dim``): the image tokens are plain context keys of both branches

        query = attn.to_q(hidden_states)
        if attn.fused_projections:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def attend(q, k, v, mask):  # noqa: ANN001, ANN202
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                        parallel_config=None)
            return out.flatten(2, 3).type_as(q)

        hidden_states = nag_cross_attention(attend, query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=1, prefix=n_img)

        if context_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(context_img).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(context_img), attn.add_v_proj(context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states = hidden_states + attend(query, key_img, value_img, None)

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _wan_text_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith("attn2") and bool(getattr(module, "is_cross_attention", False))


WAN = register_adapter(Adapter(
    family="wan",
    model_class=WanTransformer3DModel,
    processors={WanAttnProcessor: NAGWanAttnProcessor},
    select=_wan_text_attention,
    mask_arg=None,
    preset="wan",
    notes="Wan 2.1/2.2 T2V, I2V, TI2V: NAG on the text cross-attention attn2; I2V image context not negated",
))
