"""Cross-attention with NAG: one query, keys/values packed as ``[positive text | negative text]``.

The model carries the negative text as extra tokens after the positive ones (sequence packing, so every per-token
text layer — caption projections, norms — runs unchanged). Here the packed keys/values are split again:

* ``Z+ = attend(Q, K+, V+)`` for every row of the batch (exactly what the unguided model computes);
* ``Z- = attend(Q[rows], K-, V-)`` only for the guided rows (the conditional branch under batched CFG);
* the guided rows get ``nag(Z+, Z-)``; the others keep ``Z+`` untouched.

The experimental methods (``NAGConfig.method``, applied here when the guided forward runs with them, see
:func:`nagkit.core.operator.guidance_method`): ``"nasa"`` combines the same ``Z+``/``Z-`` as ``Z+ − φ·Z-``;
``"vsf"`` (Value Sign Flip) replaces both attentions of the guided rows by ONE attention over the whole packed
``[prefix | positive | negative]`` keys, the negative's values multiplied by ``−β`` and its logits lowered by
``offset`` (:func:`vsf_cross_attention`); the other rows keep ``Z+``.

``attend`` is the family's own attention call (same kernel/backend as the original processor) and returns merged
heads ``(B, Lq, H·D)``, so the NAG norm runs over the whole feature dim as in the official code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.operator import current_method, nag_combine
from ..core.state import Packing

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_heads_first(heads: int) -> Attend:
    """``attend`` for ``(B, H, L, D)`` tensors through ``F.scaled_dot_product_attention`` (the legacy processors'
    kernel), returning merged heads ``(B, Lq, H·D)`` in the query dtype."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1]).to(q.dtype)

    return attend


def _rows(x: torch.Tensor | None, packing: Packing) -> torch.Tensor | None:
    if x is None or packing.all_rows or x.shape[0] == 1:
        return x
    return x[packing.rows]


def split_text(x: torch.Tensor | None, packing: Packing, dim: int, prefix: int = 0
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a packed text tensor (keys, values or an attention bias) into its positive and negative parts.

    ``prefix`` tokens before the text (context both branches attend to, e.g. Wan image tokens without their own
    projections) are kept at the front of both parts.
    """
    if x is None:
        return None, None
    dim = dim % x.ndim
    if x.shape[dim] != prefix + packing.lp + packing.ln:
        raise RuntimeError(f"packed text length {x.shape[dim] - prefix} != {packing.lp} + {packing.ln}: the text "
                           "reaching the attention is not the packed sequence nagkit built")
    negative = x.narrow(dim, prefix + packing.lp, packing.ln)
    if prefix:
        negative = torch.cat([x.narrow(dim, 0, prefix), negative], dim=dim)
    return x.narrow(dim, 0, prefix + packing.lp), negative


def _batch_slice(x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return x if x is None or x.shape[0] == 1 else x[start:stop]


def negative_offset(mask: torch.Tensor | None, start: int, length: int, offset: float, like: torch.Tensor
                    ) -> torch.Tensor | None:
    """VSF's logit offset: ``mask`` (None, a boolean keep-mask or an additive bias, keys on the last dim) with
    ``−offset`` added on the key columns ``[start, start + length)``; unchanged when ``offset == 0``. Without a mask
    the bias is ``(1, 1, Lk)`` (broadcasts over batch, heads and queries for SDPA and ``baddbmm``-style kernels)."""
    if offset == 0:
        return mask
    total = start + length if mask is None else mask.shape[-1]
    column = torch.zeros(total, dtype=like.dtype, device=like.device)
    column[start:start + length] = -offset
    if mask is None:
        return column.view(1, 1, total)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=like.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(like.dtype) + column


def vsf_cross_attention(attend: Attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None, packing: Packing, scale: float, offset: float = 0.0,
                        seq_dim: int = -2, prefix: int = 0) -> torch.Tensor:
    """Value Sign Flip (arXiv 2508.10931; experimental) in a cross-attention layer, on nagkit's packed text.

    The guided rows attend in one softmax to all packed keys ``[prefix | positive | negative]``; the negative's
    values are multiplied by ``−scale`` (β) and its attention logits get ``−offset`` (the VSF code's Wan processor:
    ``value[..., -neg_len:] *= -scale`` and an additive bias on the negative keys). The other rows (unconditional CFG
    rows) attend to ``[prefix | positive]`` only, exactly as the plain model.

    Args:
        attend, query, key, value, mask, packing, seq_dim, prefix: as :func:`nag_cross_attention`.
        scale: β ≥ 0.
        offset: subtracted from the logits on the negative's keys.

    Returns:
        ``(B, Lq, C)``.
    """
    seq = seq_dim % key.ndim
    if key.shape[seq] != prefix + packing.lp + packing.ln:
        raise RuntimeError(f"packed text length {key.shape[seq] - prefix} != {packing.lp} + {packing.ln}: the text "
                           "reaching the attention is not the packed sequence nagkit built")
    start, rows = prefix + packing.lp, packing.rows
    flipped = torch.cat([value.narrow(seq, 0, start), value.narrow(seq, start, packing.ln) * -scale], dim=seq)
    biased = negative_offset(mask, start, packing.ln, offset, query)
    guided = attend(_rows(query, packing), _rows(key, packing), _rows(flipped, packing), _rows(biased, packing))
    if packing.all_rows:
        return guided
    k_pos, _ = split_text(key, packing, seq_dim, prefix)
    v_pos, _ = split_text(value, packing, seq_dim, prefix)
    m_pos, _ = split_text(mask, packing, -1, prefix)
    parts = []
    for lo, hi, z in ((0, rows.start, None), (rows.start, rows.stop, guided), (rows.stop, packing.batch, None)):
        if hi > lo:
            parts.append(z if z is not None else attend(query[lo:hi], _batch_slice(k_pos, lo, hi),
                                                        _batch_slice(v_pos, lo, hi), _batch_slice(m_pos, lo, hi)))
    return torch.cat(parts, dim=0)


def nag_cross_attention(attend: Attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None, packing: Packing, scale: float, tau: float, alpha: float,
                        norm: str = "l1", seq_dim: int = -2, prefix: int = 0, method: str | None = None,
                        offset: float = 0.0) -> torch.Tensor:
    """Attention with NAG for a cross-attention layer.

    Args:
        attend: ``attend(q, k, v, mask) -> (B, Lq, C)``, the family's attention with heads merged.
        query: image-token queries, batch first.
        key, value: packed text keys/values, the text sequence along ``seq_dim``.
        mask: attention bias/mask whose last dim is the packed text length, or None.
        packing: the layout (see :class:`Packing`).
        scale, tau, alpha, norm: NAG parameters (already validated).
        seq_dim: the text sequence dim of ``key``/``value`` (``-2`` for ``(B, H, L, D)``, ``1`` for ``(B, L, H, D)``).
        prefix: context tokens before the packed text that both branches attend to (not negated).
        method, offset: the guidance rule (``"nag"``, ``"nasa"``, ``"vsf"``) and VSF's logit offset; ``method=None``
            (default): the guided forward's (:func:`nagkit.core.operator.current_method`, offset included).

    Returns:
        ``(B, Lq, C)``: ``Z+`` on unguided rows, ``nag(Z+, Z-)`` on guided rows.
    """
    if method is None:
        method, offset = current_method()
    if method == "vsf":
        return vsf_cross_attention(attend, query, key, value, mask, packing, scale, offset, seq_dim, prefix)
    k_pos, k_neg = split_text(key, packing, seq_dim, prefix)
    v_pos, v_neg = split_text(value, packing, seq_dim, prefix)
    m_pos, m_neg = split_text(mask, packing, -1, prefix)
    z_pos = attend(query, k_pos, v_pos, m_pos)
    z_neg = attend(_rows(query, packing), _rows(k_neg, packing), _rows(v_neg, packing), _rows(m_neg, packing))
    target = _rows(z_pos, packing)
    if (packing.all_rows or z_pos.shape[0] != 1) and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and (z_pos.requires_grad or z_neg.requires_grad)):
        # the guided rows written over Z+ (the attention's own fresh output, read chunk by chunk before each chunk is
        # written): no full-size output and no concatenation on long videos
        nag_combine(target, z_neg, scale, tau, alpha, norm, out=target, method=method)
        return z_pos
    guided = nag_combine(target, z_neg, scale, tau, alpha, norm, method=method)
    if packing.all_rows:
        return guided
    return torch.cat([z_pos[: packing.rows.start], guided, z_pos[packing.rows.stop:]], dim=0)
