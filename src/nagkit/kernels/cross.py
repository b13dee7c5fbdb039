"""Cross-attention with NAG: one query, keys/values packed as ``[positive text | negative text]``.

The model carries the negative text as extra tokens after the positive ones (sequence packing, so every per-token
text layer — caption projections, norms — runs unchanged). Here the packed keys/values are split again:

* ``Z+ = attend(Q, K+, V+)`` for every row of the batch (exactly what the unguided model computes);
* ``Z- = attend(Q[rows], K-, V-)`` only for the guided rows (the conditional branch under batched CFG);
* the guided rows get ``nag(Z+, Z-)``; the others keep ``Z+`` untouched.

``attend`` is the family's own attention call (same kernel/backend as the original processor) and returns merged
heads ``(B, Lq, H·D)``, so the NAG norm runs over the whole feature dim as in the official code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.operator import nag_combine
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


def nag_cross_attention(attend: Attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None, packing: Packing, scale: float, tau: float, alpha: float,
                        norm: str = "l1", seq_dim: int = -2, prefix: int = 0) -> torch.Tensor:
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

    Returns:
        ``(B, Lq, C)``: ``Z+`` on unguided rows, ``nag(Z+, Z-)`` on guided rows.
    """
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
        nag_combine(target, z_neg, scale, tau, alpha, norm, out=target)
        return z_pos
    guided = nag_combine(target, z_neg, scale, tau, alpha, norm)
    if packing.all_rows:
        return guided
    return torch.cat([z_pos[: packing.rows.start], guided, z_pos[packing.rows.stop:]], dim=0)
