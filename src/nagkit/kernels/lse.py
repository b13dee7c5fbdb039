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

With a diffusers attention backend (``set_attention_backend``), :func:`attention_with_lse_backend` keeps these kernels
for PyTorch's own SDPA backends (diffusers cannot return their LSE; the aten kernels *are* those kernels) and asks
``dispatch_attention_fn`` for the LSE on backends that return one (flash-attn, FA3, sage); other backends get
``None``, and the caller falls back to two full attentions through the same backend (:func:`attend`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import attention_dispatch

NEG_INF = float("-inf")
#: Backends whose LSE is PyTorch's own SDPA kernels' (computed here by the aten kernels above).
TORCH_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn", "flex"})
#: Backends whose ``dispatch_attention_fn(..., attention_kwargs={"return_lse": True})`` returns the LSE, and its layout.
DISPATCH_LSE = {"flash": "BHL", "flash_hub": "BHL", "sage": "BHL", "sage_hub": "BHL", "_flash_3": "BLH"}


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean keep-mask or an additive float bias as an additive bias of ``dtype`` (None stays None)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.exp(scores - safe[..., None]) @ v.float()
    return out.to(q.dtype), lse


def dead_rows(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The query rows of an additive bias ``(..., Lq, Lk)`` whose keys are all masked (``-inf``): ``(..., Lq)`` bool,
    or None when there is no bias. One pass over the bias; callers attending several times with slices of one bias
    compute it once per key segment and pass the slices as ``dead=`` to :func:`attention_with_lse`."""
    if bias is None:
        return None
    return torch.isneginf(bias.amax(dim=-1))


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       scale: float | None = None, dead: torch.Tensor | None | bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention returning ``(out, lse)``.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k, v: keys/values ``(B, H, Lk, D)``.
        mask: None, a boolean keep-mask or an additive bias broadcastable to ``(B, H, Lq, Lk)``.
        scale: softmax scale (default ``1/sqrt(D)``).
        dead: the fully masked query rows, broadcastable to ``(B, H, Lq)`` (precomputed with :func:`dead_rows`),
            True to find them here from ``mask``, or False/None when the caller knows there are none.

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
    if dead is True:
        dead = dead_rows(bias)
    if isinstance(dead, torch.Tensor):
        dead = dead.expand(rows)
        lse = lse.masked_fill(dead, NEG_INF)
        out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]], heads_last: bool = False) -> torch.Tensor:
    """Exact softmax attention over the union of the key sets of ``parts`` from their ``(out, lse)``.

    Folded pairwise: with ``w = exp(lse_a − logaddexp(lse_a, lse_b)) = sigmoid(lse_a − lse_b)`` the union's output is
    ``lerp(out_b, out_a, w)`` — one fused pass per part over the outputs (weights and outputs in fp32).

    Args:
        parts: ``(out, lse)`` pairs from :func:`attention_with_lse` for the same queries and disjoint key sets.
        heads_last: return a ``(B, H, Lq, D)`` view of ``(B, Lq, H, D)``-contiguous memory, so that merging the heads
            afterwards (``.transpose(1, 2).flatten(2)``) is free.

    Returns:
        The merged output ``(B, H, Lq, D)`` in the dtype of the first part. Rows with no unmasked key in any part
        are 0.
    """
    heads_last = heads_last and not torch.compiler.is_compiling()  # (a traced graph picks its own layouts)
    out, lse = parts[0]
    out = out.float()
    for i, (o, part_lse) in enumerate(parts[1:], start=2):
        # weight of what is merged so far; both -inf (no key anywhere yet): NaN -> 0, and both outputs are 0 there
        w = torch.sigmoid(lse - part_lse).nan_to_num_(0.0)[..., None]
        if i == len(parts) and heads_last:
            b, h, length, d = o.shape
            buffer = torch.empty(b, length, h, d, dtype=torch.float32, device=o.device).transpose(1, 2)
            out = torch.lerp(o.float(), out, w, out=buffer)
        else:
            out = torch.lerp(o.float(), out, w)
        if i < len(parts):
            lse = torch.logaddexp(lse, part_lse)
    if heads_last and len(parts) == 1:
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out.to(parts[0][0].dtype)


def backend_name(backend: Any) -> str:
    """The name of a processor's ``_attention_backend`` (None: diffusers' active backend, as the dispatcher does)."""
    if backend is None:
        backend = attention_dispatch._AttentionBackendRegistry._active_backend
    return str(getattr(backend, "value", backend))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           backend: Any = None) -> torch.Tensor:
    """Plain attention through diffusers' ``dispatch_attention_fn`` with ``backend``; heads-first in and out.

    Args:
        q, k, v: ``(B, H, L, D)``.
        mask: None, or a boolean keep-mask / additive bias broadcastable to ``(B, H, Lq, Lk)``.
        backend: the module's attention backend (None: diffusers' active one).

    Returns:
        ``(B, H, Lq, D)``.
    """
    out = attention_dispatch.dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask, backend=backend, parallel_config=None)
    return out.transpose(1, 2)


def attention_with_lse_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                               backend: Any = None, dead: torch.Tensor | None | bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`attention_with_lse` for a module whose attention runs on diffusers backend ``backend``.

    Args:
        q, k, v: ``(B, H, L, D)``.
        mask: None, a boolean keep-mask or an additive bias.
        backend: the module's attention backend (None: diffusers' active one).
        dead: as :func:`attention_with_lse`.

    Returns:
        ``(out, lse)`` as :func:`attention_with_lse`, or None when the backend cannot return an LSE (then compute
        two full attentions through it instead).
    """
    name = backend_name(backend)
    if name in TORCH_BACKENDS:
        return attention_with_lse(q, k, v, mask, dead=dead)
    layout = DISPATCH_LSE.get(name)
    if layout is None or mask is not None:
        return None
    result = attention_dispatch.dispatch_attention_fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_kwargs={"return_lse": True},
        backend=name, parallel_config=None)
    if not isinstance(result, tuple):  # the backend's signature filter dropped return_lse
        return None
    out, lse = result[0], result[1]
    if layout == "BLH":
        lse = lse.transpose(1, 2)
    return out.transpose(1, 2), lse.float()
