"""Joint attention (MM-DiT) with NAG, image→image attention computed once.

The packed sequence holds the image tokens ``I``, the prompt's text ``Tp`` and the negative's text ``Tn`` (text-first
``[Tp | Tn | I]`` for Flux, image-first ``[I | Tp | Tn]`` for SD3). The segments attend as two ordinary joint
attentions that share the image::

    Tp queries -> keys [Tp, I]             (the prompt's own joint attention, unchanged)
    Tn queries -> keys [Tn, I]             (the negative text evolves as its own stream)
    I  queries -> Z+ over [Tp, I], Z- over [Tn, I];  output NAG(Z+, Z-)

``Z+`` and ``Z-`` are exact partial-softmax merges (:mod:`nagkit.kernels.lse`) of one image→image attention with the
small image→text attentions, so the negative branch never recomputes image→image attention. Without an LSE kernel the
same numbers come from two full attentions (``use_lse=False``). Every attention runs on the module's diffusers
attention backend (``set_attention_backend``) through ``dispatch_attention_fn``; see
:func:`nagkit.kernels.lse.attention_with_lse_backend` for how the LSE is obtained per backend.

Experimental methods (``NAGConfig.method``, applied when the guided forward runs with them, see
:func:`nagkit.core.operator.guidance_method`): ``"nasa"`` combines the same ``Z+``/``Z-`` as ``Z+ − φ·Z-``; ``"vsf"``
(Value Sign Flip) gives the guided image queries ONE softmax over ``[Tp, I]`` and the negative's keys ``Tn``, the
latter with values ``× −β`` and logits ``− offset``: the log-sum-exp merge of the image→image part, the image→prompt
part and the image→negative part whose output is scaled by ``−β`` and whose LSE is lowered by ``offset`` (attention is
linear in the values, and a constant logit shift moves only the LSE). Text queries are the same as for NAG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..core.operator import current_method, nag_combine
from .cross import Packing
from .lse import additive_mask, attend, attention_with_lse_backend, dead_rows, merge_attention

_TWO_ATTENTIONS = False


@contextlib.contextmanager
def force_two_attentions() -> Iterator[None]:
    """Compute ``Z+`` and ``Z-`` as two full attentions (no log-sum-exp merge) inside the block: the official
    implementation's way, used by the benchmark's reference count and by tests."""
    global _TWO_ATTENTIONS
    previous, _TWO_ATTENTIONS = _TWO_ATTENTIONS, True
    try:
        yield
    finally:
        _TWO_ATTENTIONS = previous


def lse_available(device: torch.device) -> bool:
    """Whether :func:`nagkit.kernels.lse.attention_with_lse` has a fused kernel for ``device``."""
    return device.type in ("cpu", "meta", "cuda")


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


def nag_joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packing: Packing,
                        text_first: bool, scale: float, tau: float, alpha: float, norm: str = "l1",
                        use_lse: bool | None = None, bias: torch.Tensor | None = None,
                        backend: Any = None, method: str | None = None, offset: float = 0.0) -> torch.Tensor:
    """NAG joint attention over a packed ``[Tp | Tn | I]`` (``text_first``) or ``[I | Tp | Tn]`` sequence.

    Args:
        query, key, value: heads-first ``(B, H, L, D)`` over the whole packed sequence (RoPE/norms applied).
        packing: text lengths and the guided rows.
        text_first: segment order of the model (Flux: True, SD3: False).
        scale, tau, alpha, norm: NAG parameters.
        use_lse: merge partial attentions by log-sum-exp instead of two full image attentions. Default: when the
            device has an LSE kernel (CPU, CUDA, meta) and :func:`force_two_attentions` is not active.
        bias: optional additive attention bias ``(B, 1|H, L, L)`` over the packed sequence (query x key, packed
            order), e.g. Chroma's outer-product text mask, or a key-only bias ``(B, 1|H, 1, L)`` (a key-padding mask
            that every query shares, e.g. Qwen-Image's ``[text mask | ones]``); a boolean keep-mask works too.
        backend: the module's diffusers attention backend (None: diffusers' active one; ``"native"`` for processors
            that call PyTorch's SDPA directly).
        method, offset: the guidance rule (``"nag"``, ``"nasa"``, ``"vsf"``) and VSF's logit offset; ``method=None``
            (default): the guided forward's (:func:`nagkit.core.operator.current_method`, offset included).

    Returns:
        ``(B, L, H·D)`` in the packed order and the query dtype: the joint-attention output of every token, with
        ``NAG(Z+, Z-)`` on the image tokens of the guided rows and ``Z+`` on the others.
    """
    if method is None:
        method, offset = current_method()
    if use_lse is None:
        use_lse = lse_available(query.device) and not _TWO_ATTENTIONS
    lp, ln, total = packing.lp, packing.ln, query.shape[2]
    li = total - lp - ln
    if text_first:
        sp, sn, si = slice(0, lp), slice(lp, lp + ln), slice(lp + ln, total)
    else:
        si, sp, sn = slice(0, li), slice(li, li + lp), slice(li + lp, total)

    def seg(x: torch.Tensor, s: slice) -> torch.Tensor:
        return x[:, :, s]

    def keys(text: slice, x: torch.Tensor) -> torch.Tensor:  # same key order as the model's own joint sequence
        return torch.cat([seg(x, text), seg(x, si)] if text_first else [seg(x, si), seg(x, text)], dim=2)

    # a key-only bias (size-1 query axis) applies to every query: slice its key axis only (it broadcasts)
    key_only = bias is not None and bias.shape[-2] == 1 and total > 1

    def block(qs: slice, ks: slice) -> torch.Tensor | None:
        if bias is None:
            return None
        return bias[:, :, :, ks] if key_only else bias[:, :, qs, ks]

    def block_keys(qs: slice, text: slice) -> torch.Tensor | None:
        if bias is None:
            return None
        parts = [block(qs, text), block(qs, si)] if text_first else [block(qs, si), block(qs, text)]
        return torch.cat(parts, dim=-1)

    def guided_rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None or packing.all_rows or x.shape[0] == 1 else x[rows]

    rows = packing.rows
    # the bias as an additive float once (not per attention), and per key segment the fully masked query rows once
    # (one pass over the bias; the partial attentions need them to give such a part no weight in a merge)
    bias = additive_mask(bias, query.dtype)
    dead_i = dead_rows(None if bias is None else bias[..., si])
    dead_p = dead_rows(None if bias is None else bias[..., sp])
    dead_n = dead_rows(None if bias is None else bias[..., sn])

    def dead(d: torch.Tensor | None, qs: slice) -> torch.Tensor | None:
        if d is None or key_only:  # key-only: one row per batch/head, shared (broadcast) by all queries
            return d
        return d[..., qs]
    q_i = seg(query, si)
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return attend(q, k, v, mask, backend)

    def with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,  # noqa: ANN202
                 dead_q: torch.Tensor | None):
        return attention_with_lse_backend(q, k, v, mask, backend, dead=dead_q)

    out_p = sdpa(seg(query, sp), keys(sp, key), keys(sp, value), block_keys(sp, sp))
    out_n = sdpa(seg(query, sn), keys(sn, key), keys(sn, value), block_keys(sn, sn))
    q_g = guided_rows(q_i)
    image = positive = negative = None
    if use_lse:  # any part the backend cannot give an LSE for: two full attentions instead
        image = with_lse(q_i, seg(key, si), seg(value, si), block(si, si), dead(dead_i, si))
        positive = image and with_lse(q_i, seg(key, sp), seg(value, sp), block(si, sp), dead(dead_p, si))
        negative = positive and with_lse(q_g, guided_rows(seg(key, sn)), guided_rows(seg(value, sn)),
                                         guided_rows(block(si, sn)), guided_rows(dead(dead_n, si)))
    if method == "vsf":
        if negative is not None:  # merge [I, Tp] with the negative part, its output times -β, its LSE minus offset
            flipped = (negative[0].float() * -scale, negative[1] - offset)
            if packing.all_rows:
                guided = merge_attention([image, positive, flipped], heads_last=True)
            else:
                guided = merge_attention([(image[0][rows], image[1][rows]), (positive[0][rows], positive[1][rows]),
                                          flipped], heads_last=True)
        else:  # one full attention over [Tp, I, Tn] with the negative's values flipped and its logits offset
            pos_bias, neg_bias, vsf_bias = block_keys(si, sp), block(si, sn), None
            if pos_bias is not None or offset != 0:
                if pos_bias is None:
                    pos_bias, neg_bias = query.new_zeros(1, 1, 1, lp + li), query.new_zeros(1, 1, 1, ln)
                neg_bias = neg_bias - offset
                shape = torch.broadcast_shapes(pos_bias.shape[:-1], neg_bias.shape[:-1])
                vsf_bias = torch.cat([pos_bias.expand(*shape, -1), neg_bias.expand(*shape, -1)], dim=-1)
            guided = sdpa(q_g, guided_rows(torch.cat([keys(sp, key), seg(key, sn)], dim=2)),
                          guided_rows(torch.cat([keys(sp, value), seg(value, sn) * -scale], dim=2)),
                          guided_rows(vsf_bias))
        guided = _merge_heads(guided)
        if not packing.all_rows:
            if image is not None and positive is not None:
                z_pos = merge_attention([image, positive], heads_last=True)
            else:
                z_pos = sdpa(q_i, keys(sp, key), keys(sp, value), block_keys(si, sp))
            z_pos = _merge_heads(z_pos)
    elif negative is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        if not packing.all_rows:
            image = (image[0][rows], image[1][rows])
        z_neg = merge_attention([image, negative], heads_last=True)
    else:
        z_pos = sdpa(q_i, keys(sp, key), keys(sp, value), block_keys(si, sp))
        z_neg = sdpa(q_g, guided_rows(keys(sn, key)), guided_rows(keys(sn, value)), guided_rows(block_keys(si, sn)))
    if method != "vsf":
        z_pos, z_neg = _merge_heads(z_pos), _merge_heads(z_neg)
        guided = nag_combine(z_pos if packing.all_rows else z_pos[rows], z_neg, scale, tau, alpha, norm,
                             method=method)
    if not packing.all_rows:
        guided = torch.cat([z_pos[: rows.start], guided, z_pos[rows.stop:]], dim=0)
    parts = [_merge_heads(out_p), _merge_heads(out_n), guided] if text_first else \
        [guided, _merge_heads(out_p), _merge_heads(out_n)]
    return torch.cat(parts, dim=1).to(query.dtype)
