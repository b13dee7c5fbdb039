"""Attention that also returns the log-sum-exp (LSE) of its scores, and the exact merge of partial attentions.

Softmax attention over a key set split in parts ``K = K1 ∪ K2`` is recovered exactly from the parts' outputs and
LSEs (the partial-softmax identity used by flash attention)::

    lse = log(exp(lse1) + exp(lse2))
    out = exp(lse1 − lse)·out1 + exp(lse2 − lse)·out2

NAG in joint attention needs ``Z+ = attn(Q_img, [K_img, K_pos])`` and ``Z- = attn(Q_img, [K_img, K_neg])``: the large
image→image part is computed once and merged with the two small text parts.

Kernels (all heads-first ``(B, H, L, D)``):

* CPU and meta: ``aten._scaled_dot_product_flash_attention_for_cpu`` returns the LSE. A fully masked query row comes
  back with ``out = 0`` and ``lse = 0``; it is set to ``-inf`` here so that it carries no weight in a merge.
* CUDA (not yet exercised on a GPU by the test suite): ``aten._scaled_dot_product_flash_attention`` for fp16/bf16
  without a mask, else ``aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True)`` (any dtype, additive
  bias; its LSE is padded to a multiple of 32 along the query dim and sliced back).
* Anything else (or a kernel refusing the inputs): an explicit ``softmax`` fallback that computes the same numbers.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean keep-mask or an additive float bias as an additive bias of ``dtype`` (None stays None)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


def _fully_masked(bias: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if bias is None:
        return None
    return torch.isneginf(bias).all(dim=-1).expand(shape)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.exp(scores - safe[..., None]) @ v.float()
    return out.to(q.dtype), lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention returning ``(out, lse)``.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k, v: keys/values ``(B, H, Lk, D)``.
        mask: None, a boolean keep-mask or an additive bias broadcastable to ``(B, H, Lq, Lk)``.
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``out`` ``(B, H, Lq, D)`` in the dtype of ``q`` and ``lse`` ``(B, H, Lq)`` in fp32, natural log; rows whose
        keys are all masked have ``out = 0`` and ``lse = -inf``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = additive_mask(mask, q.dtype)
    rows = q.shape[:-1]
    if q.device.type in ("cpu", "meta") and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        lse = lse.float()
    elif q.device.type == "cuda":
        out = lse = None
        if bias is None and q.dtype in (torch.float16, torch.bfloat16):
            try:  # flash: half precision, no mask; lse (B, H, Lq) fp32
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                              scale=scale)[:2]
            except RuntimeError:
                out = lse = None
        if out is None:
            full = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            try:  # memory-efficient: any dtype, additive bias; lse padded to a multiple of 32
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, full, True, 0.0, False, scale=scale)[:2]
                lse = lse[..., : q.shape[2]]
            except RuntimeError:
                out, lse = _math(q, k, v, bias, scale)
        lse = lse.float()
    else:
        out, lse = _math(q, k, v, bias, scale)
    dead = _fully_masked(bias, rows)
    if dead is not None:
        lse = lse.masked_fill(dead, NEG_INF)
        out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax attention over the union of the key sets of ``parts`` from their ``(out, lse)``.

    Args:
        parts: ``(out, lse)`` pairs from :func:`attention_with_lse` for the same queries and disjoint key sets.

    Returns:
        The merged output ``(B, H, Lq, D)`` in the dtype of the first part (weights in fp32). Rows with no
        unmasked key in any part are 0.
    """
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    out = sum(torch.exp(lse - total)[..., None] * o.float() for o, lse in parts)
    return out.to(parts[0][0].dtype)
