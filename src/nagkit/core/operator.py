"""The NAG operator: extrapolate, cap, blend — per token, over the whole feature dim.

Paper (arXiv 2505.21179, Eq. 7-10), written with the code convention ``s = nag_scale = φ + 1``::

    Z~ = s·Z+ − (s−1)·Z-                 # = Z+ + φ(Z+ − Z-)
    r  = ‖Z~‖ / ‖Z+‖                      # per token, L1 over the last dim (L2 optional)
    Ẑ  = Z~ · min(r, τ) / r               # cap the norm growth at τ
    out = α·Ẑ + (1−α)·Z+

Numerics. ``min(r, τ)/r`` is evaluated as ``f = min(1, τ·‖Z+‖ / ‖Z~‖)``, which is the same number for every
``r > 0`` and never divides by ``‖Z+‖``. The one division guards its denominator with the smallest normal fp32
number, so:

* ``‖Z~‖ = 0`` (then ``Z~ = 0``): the result is ``α·0 + (1−α)·Z+``;
* ``‖Z+‖ = 0`` but ``‖Z~‖ > 0``: ``f = 0`` — the guided term is capped to ``τ·0 = 0``, which keeps the bound
  ``‖Ẑ‖ ≤ τ‖Z+‖`` exact; the result is ``(1−α)·Z+`` (= 0 here);
* nothing produces NaN or Inf from finite inputs. Norms, the ratio and the blend run in fp32 on each token divided
  by a power of two near its largest entry (exact, and overflow-free even for bf16 values near the fp32 limit); the
  result is cast back to the input dtype, saturating at its largest finite value.
"""

from __future__ import annotations

import torch

Number = float | int | torch.Tensor

_TINY = torch.finfo(torch.float32).tiny
NORMS = ("l1", "l2")


def _value(x: Number) -> float | None:
    """A Python number for validation, or None when the check would need a host sync under compile."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 0:
            raise ValueError(f"NAG parameters must be Python numbers or 0-dim tensors, got a tensor of shape "
                             f"{tuple(x.shape)}")
        if torch.compiler.is_compiling() or x.device.type == "meta":
            return None
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"NAG parameters must be Python numbers or 0-dim tensors, got {type(x).__name__}")
    return float(x)


def validate_params(scale: Number, tau: Number, alpha: Number) -> None:
    """Check the NAG parameters; raise ``ValueError`` naming the parameter and its allowed range.

    Args:
        scale: ``nag_scale`` (paper φ + 1); allowed ``scale ≥ 0`` (``≤ 1`` means off).
        tau: the norm cap τ; allowed ``tau > 0``.
        alpha: the blend α; allowed ``0 ≤ alpha ≤ 1``.
    """
    s, t, a = _value(scale), _value(tau), _value(alpha)
    if s is not None and not (s >= 0 and s < float("inf")):
        raise ValueError(f"scale must be a finite number >= 0 (nag_scale = paper phi + 1; <= 1 is off), got {s}")
    if t is not None and not (t > 0 and t < float("inf")):
        raise ValueError(f"tau must be a finite number > 0, got {t}")
    if a is not None and not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {a}")


def is_identity(scale: Number, alpha: Number) -> bool:
    """True when NAG is off for Python-number parameters (``scale ≤ 1`` or ``alpha == 0``)."""
    if isinstance(scale, torch.Tensor) or isinstance(alpha, torch.Tensor):
        return False
    return scale <= 1 or alpha == 0


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number, alpha: Number,
                norm: str = "l1") -> torch.Tensor:
    """The NAG math without validation or identity shortcuts (the hot path used by the attention processors).

    Args:
        z_pos: attention output with the prompt, ``(..., C)``.
        z_neg: attention output with the negative prompt, same shape.
        scale, tau, alpha: as in :func:`nag`.
        norm: ``"l1"`` (paper) or ``"l2"`` (the official diffusers Flux processor).

    Returns:
        The guided output, same shape and dtype as ``z_pos``.
    """
    z = z_pos.float()
    # NAG is homogeneous: nag(c·Z+, c·Z-) = c·nag(Z+, Z-). Working on each token divided by a power of two near its
    # largest entry keeps every intermediate (s·Z+, the norms) far from overflow, and the power-of-two scaling is exact.
    peak = torch.maximum(z.abs().amax(-1, keepdim=True), z_neg.abs().amax(-1, keepdim=True).float()).clamp_min(_TINY)
    unit = torch.exp2(torch.floor(torch.log2(peak)))
    inv = 1.0 / unit  # exact: a power of two
    p, n = z * inv, z_neg.float() * inv
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=p.device, dtype=p.dtype)
    g = torch.lerp(n, p, scale)  # s·p − (s−1)·n
    order = 1 if norm == "l1" else 2
    n_pos = torch.linalg.vector_norm(p, ord=order, dim=-1, keepdim=True)
    n_g = torch.linalg.vector_norm(g, ord=order, dim=-1, keepdim=True)
    factor = (tau * n_pos / n_g.clamp_min(_TINY)).clamp(max=1.0)  # min(1, τ‖Z+‖/‖Z~‖) = min(r, τ)/r
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=p.device, dtype=p.dtype)
    out = torch.lerp(p, g * factor, alpha) * unit  # α·Ẑ + (1−α)·Z+, back to Z's scale (exact)
    if z_pos.dtype != torch.float32:  # saturate instead of overflowing a narrower dtype
        big = torch.finfo(z_pos.dtype).max
        out = out.clamp(-big, big)
    return out.to(z_pos.dtype)


def nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number = 2.5, alpha: Number = 0.25,
        norm: str = "l1") -> torch.Tensor:
    """Normalized Attention Guidance on two attention outputs.

    ``scale`` follows the official code (``nag_scale``): it equals the paper's φ + 1, so the paper's
    "φ = 4" is ``scale=5``, and ``scale ≤ 1`` switches guidance off.

    Args:
        z_pos: ``Z+``, the attention output for the prompt, shape ``(..., C)`` with the feature dim last
            (heads merged: the norm runs over all ``heads·head_dim`` channels of a token).
        z_neg: ``Z-``, the attention output for the negative prompt; same shape, dtype and device.
        scale: ``nag_scale ≥ 0``; Python number or 0-dim tensor (tensors avoid recompiles under ``torch.compile``).
        tau: the cap τ > 0 on ``‖Z~‖ / ‖Z+‖``.
        alpha: blend ``0 ≤ α ≤ 1`` between the capped guidance and ``Z+``.
        norm: ``"l1"`` (default, the paper's) or ``"l2"``.

    Returns:
        ``α·Ẑ + (1−α)·Z+`` in the dtype of ``z_pos``. With Python numbers and ``scale ≤ 1`` or ``alpha == 0``
        this is ``z_pos`` itself; with tensor parameters the same identity holds value-for-value (no host sync).

    Example:
        >>> z = nag(z_pos, z_neg, scale=5.0, tau=2.5, alpha=0.25)
    """
    if not isinstance(z_pos, torch.Tensor) or not isinstance(z_neg, torch.Tensor):
        raise TypeError("z_pos and z_neg must be tensors")
    if z_pos.shape != z_neg.shape:
        raise ValueError(f"z_pos and z_neg must have the same shape, got {tuple(z_pos.shape)} and "
                         f"{tuple(z_neg.shape)}")
    if z_pos.dtype != z_neg.dtype:
        raise ValueError(f"z_pos and z_neg must have the same dtype, got {z_pos.dtype} and {z_neg.dtype}")
    if z_pos.device != z_neg.device:
        raise ValueError(f"z_pos and z_neg must be on the same device, got {z_pos.device} and {z_neg.device}")
    if not z_pos.is_floating_point():
        raise ValueError(f"z_pos and z_neg must be floating point, got {z_pos.dtype}")
    if z_pos.ndim < 1:
        raise ValueError("z_pos and z_neg need a feature dim (ndim >= 1)")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    validate_params(scale, tau, alpha)
    if is_identity(scale, alpha):
        return z_pos
    out = nag_combine(z_pos, z_neg, scale, tau, alpha, norm)
    if isinstance(scale, torch.Tensor) or isinstance(alpha, torch.Tensor):
        on = torch.as_tensor(scale > 1, device=z_pos.device) & torch.as_tensor(alpha != 0, device=z_pos.device)
        out = torch.where(on, out, z_pos)
    return out
