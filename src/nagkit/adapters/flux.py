"""FLUX.1 ``FluxTransformer2DModel`` (schnell, dev, Kontext) and Chroma: NAG in every double- and single-stream block.

Layout ``[Tp | Tn | I]`` (text first). The negative text is packed after the prompt's text (its RoPE position ids are
zeros, like every Flux text token) and travels through all blocks as its own stream; the image stream stays single:

* double blocks: image queries give ``NAG(Z+, Z-)``; the image→image attention is computed once (LSE merge);
* single blocks (``fast`` mode): the same rule on the concatenated sequence — image tokens are never duplicated, and
  per-token work (norms, MLP, projections) runs once on them.

Modulation of the negative text follows the official code: the negative branch is conditioned with the *negative*
pooled CLIP embedding (``temb`` of the negative), applied per segment by block hooks; when no negative pooled
embedding is given (bare denoiser without ``pooled_projections`` in ``negative``), the prompt's is used.

``mode="official"`` reproduces the official diffusers code: its single blocks run a second copy of the image tokens
under the negative modulation (so the negative branch sees image keys/values that drift from the image stream), and
it uses the L2 norm. The double blocks are the same in both modes. ``fast`` keeps one image stream.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from ..core.operator import nag_combine
from ..kernels.joint import nag_joint_attention
from ..kernels.lse import attend
from .base import Adapter, NAGProcessor, register_adapter


def _projections(attn: torch.nn.Module, hidden_states: torch.Tensor, text: torch.Tensor | None):
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if text is not None:
            return (query, key, value, *attn.to_added_qkv(text).chunk(3, dim=-1))
        return query, key, value, None, None, None
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if text is not None:
        return query, key, value, attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
    return query, key, value, None, None, None


class NAGFluxAttnProcessor(NAGProcessor):
    """``FluxAttnProcessor`` with NAG on the image tokens (double blocks: separate text input; single blocks: the
    packed ``[Tp | Tn | I]`` sequence)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cfg = self.state.config
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on FLUX/Chroma joint attention does not support context parallelism "
                                      "(enable_parallelism): the sequence split would cut the packed negative text")
        query, key, value, t_query, t_key, t_value = _projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            query = torch.cat([attn.norm_added_q(t_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(t_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([t_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = nag_joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), packing,
                                  text_first=True, scale=cfg.scale, tau=cfg.tau, alpha=cfg.alpha, norm=cfg.norm,
                                  bias=attention_mask, backend=self._attention_backend)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, text_len:].contiguous()))
        return hidden_states, attn.to_add_out(out[:, :text_len].contiguous())


def _per_token(pos: torch.Tensor, neg: torch.Tensor, lp: int, ln: int, tail: int = 0) -> torch.Tensor:
    """Per-row modulation ``(B, D)`` of each segment as one per-token tensor ``(B, lp+ln+tail, D)``."""
    parts = [pos[:, None].expand(-1, lp, -1), neg[:, None].expand(-1, ln, -1)]
    if tail:
        parts.append(pos[:, None].expand(-1, tail, -1))
    return torch.cat(parts, dim=1)


def _double_block(block: FluxTransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                  joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` with the negative text modulated by the negative's ``temb``."""
    temb_neg = state.extras.get("temb_neg")
    if temb_neg is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    lp, ln = state.packing.lp, state.packing.ln
    norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    pos = block.norm1_context(encoder_hidden_states[:, :lp], emb=temb)
    neg = block.norm1_context(encoder_hidden_states[:, lp:], emb=temb_neg)
    c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
        _per_token(p, n, lp, ln) for p, n in zip(pos[1:], neg[1:], strict=True))
    outputs = block.attn(hidden_states=norm_hidden, encoder_hidden_states=torch.cat([pos[0], neg[0]], dim=1),
                         image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = outputs[0], outputs[1]

    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    norm_hidden = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * block.ff(norm_hidden)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_output
    norm_text = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp) + c_shift_mlp
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * block.ff_context(norm_text)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _segment_attention(attn: torch.nn.Module, hidden_states: torch.Tensor, rope: Any) -> torch.Tensor:
    """The single block's own joint attention over one segment (``FluxAttnProcessor`` math, merged heads)."""
    query, key, value, _, _, _ = _projections(attn, hidden_states, None)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None,
                 getattr(attn.processor, "_attention_backend", None))
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _single_block_official(block: FluxSingleTransformerBlock, state: Any, hidden_states: torch.Tensor,
                           encoder_hidden_states: torch.Tensor, temb: torch.Tensor, temb_neg: torch.Tensor,
                           image_rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The official single block: the negative row ``[Tn | I']`` carries its own image copy ``I'`` (entering the
    single blocks as a copy of the image stream) under the negative's modulation; both rows' image attention outputs
    are replaced by ``NAG(Z+, Z-)``. Kept across blocks in ``state.extras["image_copy"]``."""
    packing, cfg = state.packing, state.config
    lp, ln, rows = packing.lp, packing.ln, packing.rows
    copy = state.extras.get("image_copy", hidden_states)
    pos = torch.cat([encoder_hidden_states[:, :lp], hidden_states], dim=1)
    neg = torch.cat([encoder_hidden_states[:, lp:], copy], dim=1)
    if image_rotary_emb is not None:
        rope_pos = tuple(torch.cat([r[:lp], r[lp + ln:]]) for r in image_rotary_emb)
        rope_neg = tuple(r[lp:] for r in image_rotary_emb)
    else:
        rope_pos = rope_neg = None
    norm_pos, gate_pos = block.norm(pos, emb=temb)
    norm_neg, gate_neg = block.norm(neg, emb=temb_neg)
    attn_pos = _segment_attention(block.attn, norm_pos, rope_pos)
    attn_neg = _segment_attention(block.attn, norm_neg, rope_neg)
    z_pos = attn_pos[:, lp:]
    guided = nag_combine(z_pos[rows], attn_neg[rows, ln:], cfg.scale, cfg.tau, cfg.alpha, cfg.norm)
    image_pos = torch.cat([z_pos[: rows.start], guided, z_pos[rows.stop:]])
    image_neg = torch.cat([attn_neg[: rows.start, ln:], guided, attn_neg[rows.stop:, ln:]])
    attn_pos = torch.cat([attn_pos[:, :lp], image_pos], dim=1)
    attn_neg = torch.cat([attn_neg[:, :ln], image_neg], dim=1)
    mlp_pos, mlp_neg = block.act_mlp(block.proj_mlp(norm_pos)), block.act_mlp(block.proj_mlp(norm_neg))
    pos = pos + gate_pos.unsqueeze(1) * block.proj_out(torch.cat([attn_pos, mlp_pos], dim=2))
    neg = neg + gate_neg.unsqueeze(1) * block.proj_out(torch.cat([attn_neg, mlp_neg], dim=2))
    if pos.dtype == torch.float16:
        pos, neg = pos.clip(-65504, 65504), neg.clip(-65504, 65504)
    state.extras["image_copy"] = neg[:, ln:]
    return torch.cat([pos[:, :lp], neg[:, :ln]], dim=1), pos[:, lp:]


def _single_block(block: FluxSingleTransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                  joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` with the negative text modulated by the negative's ``temb``
    (``fast``), or the official doubled-image single block (``official``)."""
    temb_neg = state.extras.get("temb_neg")
    if state.config.mode == "official":
        if joint_attention_kwargs:
            raise NotImplementedError("mode='official' takes no joint_attention_kwargs")
        return _single_block_official(block, state, hidden_states, encoder_hidden_states, temb,
                                      temb if temb_neg is None else temb_neg, image_rotary_emb)
    if temb_neg is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    lp, ln = state.packing.lp, state.packing.ln
    text_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden, gate = block.norm(hidden_states, emb=temb)
    norm_neg, gate_neg = block.norm(hidden_states[:, lp:lp + ln], emb=temb_neg)
    norm_hidden = torch.cat([norm_hidden[:, :lp], norm_neg, norm_hidden[:, lp + ln:]], dim=1)
    gate = _per_token(gate, gate_neg, lp, ln, hidden_states.shape[1] - lp - ln)
    mlp_hidden = block.act_mlp(block.proj_mlp(norm_hidden))
    attn_output = block.attn(hidden_states=norm_hidden, image_rotary_emb=image_rotary_emb,
                             **(joint_attention_kwargs or {}))
    hidden_states = residual + gate * block.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


def _prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
             state: Any) -> tuple[tuple, dict]:
    """Zero RoPE ids for the negative text; the negative's ``temb`` from its pooled embedding."""
    txt_ids = access.get("txt_ids", args, kwargs)
    if txt_ids is not None:
        ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        args, kwargs = access.set("txt_ids", torch.cat([ids, ids.new_zeros(packing.ln, ids.shape[-1])]), args, kwargs)
    pooled_neg = extras.get("pooled_projections")
    if pooled_neg is not None:
        pooled = access.get("pooled_projections", args, kwargs)
        full = pooled.clone()
        full[packing.rows] = pooled_neg.to(device=pooled.device, dtype=pooled.dtype)
        # the compute dtype, as FluxTransformer2DModel.forward casts the timestep (the x_embedder output's dtype);
        # not a weight's dtype, which is the *storage* dtype under layerwise casting (fp8)
        dtype = access.get("hidden_states", args, kwargs).dtype
        timestep = access.get("timestep", args, kwargs).to(dtype) * 1000
        guidance = access.get("guidance", args, kwargs)
        if guidance is None:
            state.extras["temb_neg"] = model.time_text_embed(timestep, full)
        else:
            state.extras["temb_neg"] = model.time_text_embed(timestep, guidance.to(dtype) * 1000, full)
    return args, kwargs


def _chroma_prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
                    state: Any) -> tuple[tuple, dict]:
    if state.config.mode == "official":
        raise ValueError("Chroma has no official NAG implementation to reproduce; use mode='fast'")
    return _prepare(model, access, args, kwargs, extras, packing, state)


def _chroma_mask(access: Any, args: tuple, kwargs: dict, mask: torch.Tensor | None, packing: Any
                 ) -> tuple[tuple, dict]:
    """Chroma's ``attention_mask`` covers ``[text | image]``: the negative's part goes in after the prompt's text."""
    pos_mask = access.get("attention_mask", args, kwargs)
    if pos_mask is None and mask is None:
        return args, kwargs
    batch, lp, ln = packing.batch, packing.lp, packing.ln
    if pos_mask is None:
        text = access.get("encoder_hidden_states", args, kwargs)
        length = lp + access.get("hidden_states", args, kwargs).shape[1]
        pos_mask = torch.ones(batch, length, device=text.device, dtype=torch.long)
    neg_mask = torch.ones(batch, ln, device=pos_mask.device, dtype=pos_mask.dtype)
    if mask is not None:
        neg_mask[packing.rows] = mask.to(device=pos_mask.device, dtype=pos_mask.dtype)
    packed = torch.cat([pos_mask[:, :lp], neg_mask, pos_mask[:, lp:]], dim=1)
    return access.set("attention_mask", packed, args, kwargs)


def _flux_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith(".attn") and hasattr(module, "head_dim")


FLUX = register_adapter(Adapter(
    family="flux",
    model_class=FluxTransformer2DModel,
    processors={FluxAttnProcessor: NAGFluxAttnProcessor},
    select=_flux_attention,
    mask_arg=None,
    timestep_max=1.0,  # the Flux pipelines pass t / 1000
    preset="flux",
    notes="FLUX.1 schnell/dev/Kontext: NAG on the image tokens of every double and single block; one image stream "
          "(fast mode), negative text modulated with the negative pooled embedding (official choice)",
    negative_keys=("pooled_projections",),
    official_norm="l2",  # the official diffusers Flux processor uses the L2 norm
    prepare=_prepare,
    block_forwards={FluxTransformerBlock: _double_block, FluxSingleTransformerBlock: _single_block},
))


CHROMA = register_adapter(Adapter(
    family="chroma",
    model_class=ChromaTransformer2DModel,
    processors={FluxAttnProcessor: NAGFluxAttnProcessor},
    select=_flux_attention,
    mask_arg="attention_mask",
    mask_packer=_chroma_mask,
    timestep_max=1.0,
    preset="chroma",
    notes="Chroma: as Flux fast mode (modulation is text-independent); Chroma's own additive text-mask semantics "
          "kept for the negative segment",
    prepare=_chroma_prepare,
))
