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

Speed. The combination is a handful of elementwise passes and per-token reductions over ``(..., C)``: memory-bound,
invisible to a FLOP count, but not free in wall time. :func:`nag_combine` runs it as one ``torch.compile``d
(inductor) function on CPU and CUDA — one kernel per reduction stage instead of about fifteen ATen calls and their
temporaries — with dynamic shapes (new token counts do not recompile) and Python-number parameters kept symbolic
(new values do not recompile). It falls back, silently and for good on that device type, to the eager
implementation of the same formula when compiling is unavailable or fails (no C++ compiler, no Triton, …), and it
uses the eager path anyway on meta and other devices, under an outer ``torch.compile``/``torch.jit`` trace (which
then traces a functional copy of the math into its own graph), under a tensor subclass or a dispatch mode (FLOP
counters, fake tensors), with gradients, and for tensors under :data:`COMPILE_MIN_NUMEL` elements (tiny models and
tests: compiling would cost more than it saves). ``NAGKIT_COMPILE=0`` (or :func:`set_compile`) turns it off.

Memory. A long video makes one combination large (Wan 14B at 720p, 81 frames: 75 k tokens × 5120 channels, 0.75 GiB
in bf16 per tensor), and its fp32 temporaries would be several times that. Above :data:`CHUNK_NUMEL` elements,
:func:`nag_combine` (compiled and eager paths alike) therefore runs over chunks of whole tokens (rows of the input
flattened to ``(tokens, C)``, about :data:`CHUNK_NUMEL` elements each, never a chunk of one row) and writes each
chunk's result into one preallocated output (or into ``out``, which may be ``z_pos`` itself): the peak beyond the
inputs is the output plus a few chunk-sized fp32 buffers. Every token's math is independent of the others, so the
result is bit for bit the unchunked one. The differentiable path (gradients) and an outer ``torch.compile`` trace
run unchunked (autograd keeps its temporaries anyway; the outer graph is fused by its own compiler), and so do meta
tensors and tensor subclasses (FLOP counting, fake tensors: no memory to save).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

Number = float | int | torch.Tensor

_TINY = torch.finfo(torch.float32).tiny
NORMS = ("l1", "l2")
# fp32 bit patterns: exponent field mask; the largest per-token unit allowed (2^126, so that its inverse 2^-126 is
# still a normal number and survives flush-to-zero); and 2^127's exponent field plus one step, for inverses.
_EXPONENT = 0x7F800000
_MAX_UNIT = 253 << 23
_INVERSE = 254 << 23

#: Environment variable: ``0``/``false``/``no``/``off`` makes :func:`nag_combine` never compile.
COMPILE_ENV = "NAGKIT_COMPILE"
#: Tensors with fewer elements than this take the eager path (compiling costs seconds once; it pays off on real
#: models, where one combination is 10⁵–10⁸ elements, not on tiny test models).
COMPILE_MIN_NUMEL = 1 << 16
#: Distinct compiled variants (device type, dtype, norm, parameter kinds, grad/inference mode, CPU threads) before
#: new ones stay eager (below torch._dynamo's own recompile limit, so that limit's warning never shows).
COMPILE_MAX_VARIANTS = 6
#: Inputs with more elements than this are combined in chunks of whole tokens of about this many elements each (64 MiB
#: per fp32 temporary; a call per chunk costs about 0.1 ms of host time, so 75 k × 5120 takes 23 chunks); see "Memory"
#: in the module docstring.
CHUNK_NUMEL = 1 << 24
_COMPILE_DEVICES = ("cpu", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_log = logging.getLogger(__name__)


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


def _units(peak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token powers of two ``(unit, 1/unit)`` with ``unit ≤ peak < 2·unit``, read off the fp32 exponent bits
    (exact by construction; ``unit`` clamped to ``[2^-126, 2^126]``, so both are normal numbers)."""
    bits = (peak.clamp_min(_TINY).view(torch.int32) & _EXPONENT).clamp_max(_MAX_UNIT)
    return bits.view(torch.float32), (_INVERSE - bits).view(torch.float32)


def _as_param(x: Number, like: torch.Tensor) -> Number:
    return x.to(device=like.device, dtype=like.dtype) if isinstance(x, torch.Tensor) else x


def _norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        return x.abs().sum(-1, keepdim=True)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _saturate(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.float32:  # saturate instead of overflowing a narrower dtype
        big = torch.finfo(dtype).max
        out = out.clamp(-big, big)
    return out.to(dtype)


def combine_reference(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number, alpha: Number,
                      norm: str = "l1") -> torch.Tensor:
    """The combination as plain functional tensor code: what :func:`nag_combine` compiles, and what an outer
    ``torch.compile`` traces. Same arguments and result as :func:`nag_combine`.

    With ``p = Z+/u`` and ``n = Z-/u`` (``u`` a power of two near the token's largest entry):
    ``g = p + (s−1)(p − n)``, ``f = min(1, τ‖p‖/‖g‖)``, ``out = u·(p + α(f·g − p))``.
    """
    z, zn = z_pos.float(), z_neg.float()
    # NAG is homogeneous: nag(c·Z+, c·Z-) = c·nag(Z+, Z-). Working on each token divided by a power of two near its
    # largest entry keeps every intermediate (s·Z+, the norms) far from overflow, and the power-of-two scaling is exact.
    unit, inv = _units(torch.maximum(z.abs().amax(-1, keepdim=True), zn.abs().amax(-1, keepdim=True)))
    p = z * inv
    g = p + (_as_param(scale, p) - 1) * (p - zn * inv)  # s·p − (s−1)·n
    factor = (tau * _norm(p, norm) / _norm(g, norm).clamp_min(_TINY)).clamp(max=1.0)  # min(1, τ‖Z+‖/‖Z~‖)
    out = (p + _as_param(alpha, p) * (g * factor - p)) * unit  # α·Ẑ + (1−α)·Z+, back to Z's scale (exact)
    return _saturate(out, z_pos.dtype)


def combine_eager(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number, alpha: Number,
                  norm: str = "l1") -> torch.Tensor:
    """:func:`combine_reference` with in-place ATen calls (the eager fallback of :func:`nag_combine`): three
    full-size fp32 buffers instead of about ten, no ``|Z|`` temporaries for the peaks, the extrapolation and the blend
    as one ``lerp`` each (the same numbers up to rounding: ``lerp`` evaluates ``a + w(b − a)`` as ``b − (1−w)(b − a)``
    for ``w ≥ 0.5``)."""
    z, zn = z_pos.float(), z_neg.float()
    t = z.abs()
    peak = t.amax(-1, keepdim=True)
    peak = torch.maximum(peak, torch.abs(zn, out=t).amax(-1, keepdim=True))
    unit, inv = _units(peak)
    p = z * inv
    g = torch.mul(zn, inv, out=t).lerp_(p, _as_param(scale, p))  # s·p − (s−1)·n
    if norm == "l1" and p.device.type == "cpu":  # CPU's vector_norm(ord=1) is several times slower than abs + sum
        buf = p.abs()
        n_pos = buf.sum(-1, keepdim=True)
        n_g = torch.abs(g, out=buf).sum(-1, keepdim=True)
        del buf
    else:  # one fused reduction elsewhere (CUDA)
        order = 1 if norm == "l1" else 2
        n_pos = torch.linalg.vector_norm(p, ord=order, dim=-1, keepdim=True)
        n_g = torch.linalg.vector_norm(g, ord=order, dim=-1, keepdim=True)
    factor = n_pos.mul_(tau).div_(n_g.clamp_min_(_TINY)).clamp_(max=1.0)
    out = p.lerp_(g.mul_(factor), _as_param(alpha, p)).mul_(unit)  # α·f·g + (1−α)·p, back to Z's scale
    if z_pos.dtype != torch.float32:
        big = torch.finfo(z_pos.dtype).max
        out.clamp_(-big, big)
    return out.to(z_pos.dtype)


# ------------------------------------------------------------------------------------------------ methods
# The guidance rule of the guided forward in flight: ("nag" | "nasa" | "vsf", VSF offset). Set by the denoiser hook
# around a guided forward (:func:`guidance_method`) and read by :func:`nag_combine` and the kernels
# (:mod:`nagkit.kernels`), so that every family's NAG processor applies the configured method without passing it.
_METHOD: tuple[str, float] = ("nag", 0.0)


@contextlib.contextmanager
def guidance_method(method: str, offset: float = 0.0) -> Iterator[None]:
    """Make ``method`` (``"nag"``, ``"nasa"`` or ``"vsf"``, experimental but for NAG) the rule that
    :func:`nag_combine` and the kernels of :mod:`nagkit.kernels` apply inside the block (the denoiser hook wraps
    every guided forward in it with the guide's :class:`~nagkit.core.config.NAGConfig`)."""
    global _METHOD
    previous, _METHOD = _METHOD, (method, float(offset))
    try:
        yield
    finally:
        _METHOD = previous


def current_method() -> tuple[str, float]:
    """``(method, offset)`` of the guided forward in flight (``("nag", 0.0)`` outside one)."""
    return _METHOD


def nasa_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """NASA (negative-away steering attention, SNOOPI arXiv 2412.02687; experimental): ``Z+ − φ·Z-`` per element,
    no normalisation. One rounding in the input dtype (the subtraction runs in fp32 opmath for bf16/fp16), saturated
    at the dtype's largest finite value.

    Args:
        z_pos, z_neg: the attention outputs with the prompt and with the negative, same shape.
        scale: φ ≥ 0 (``NAGConfig.scale`` with ``method="nasa"``).
        out: where to write the result (may be ``z_pos`` itself), or None.
    """
    if isinstance(scale, torch.Tensor) or torch.is_grad_enabled() and (z_pos.requires_grad or z_neg.requires_grad):
        result = z_pos - z_neg * _as_param(scale, z_pos)
    else:
        result = torch.add(z_pos, z_neg, alpha=-float(scale))
    if result.dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(result.dtype).max
        result = result.clamp(-big, big)
    return result if out is None else out.copy_(result)


# ------------------------------------------------------------------------------------------------ compiled path
_compile_override: bool | None = None
_compiled: Callable[..., torch.Tensor] | None = None
_variants: set[tuple[Any, ...]] = set()
_eager_variants: set[tuple[Any, ...]] = set()
_broken: dict[str, str] = {}  # device type -> why compiling failed there


def set_compile(enabled: bool | None) -> None:
    """Turn the compiled combination on or off for this process (None: follow ``NAGKIT_COMPILE``, default on).

    Args:
        enabled: True, False, or None.
    """
    global _compile_override
    _compile_override = enabled


def compile_enabled() -> bool:
    """Whether :func:`nag_combine` may compile: :func:`set_compile`'s setting, else ``NAGKIT_COMPILE`` (on unless
    ``0``, ``false``, ``no`` or ``off``)."""
    if _compile_override is not None:
        return _compile_override
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compile_status() -> dict[str, Any]:
    """What the compiled path has done in this process.

    Returns:
        ``{"enabled", "variants", "failed"}``: whether it may compile, how many variants were compiled (or tried),
        and ``{device type: error}`` for the device types that fell back to eager after a failure.
    """
    return {"enabled": compile_enabled(), "variants": len(_variants), "failed": dict(_broken)}


def reset_compiled() -> None:
    """Forget the compiled function, its variants and past failures (tests; after ``torch._dynamo.reset()``)."""
    global _compiled
    _compiled = None
    _variants.clear()
    _eager_variants.clear()
    _broken.clear()


def _dispatch_mode_active() -> bool:
    """A Python dispatch mode (FlopCounterMode, FakeTensorMode, …) is active: it must see the eager ops."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - a torch without it: stay on the safe side
        return True
    return _get_current_dispatch_mode() is not None


def _compiled_variant(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number, alpha: Number,
                      norm: str) -> tuple[Any, ...] | None:
    """The variant key when the compiled path applies to this call, else None."""
    device = z_pos.device.type
    if (device not in _COMPILE_DEVICES or device in _broken or z_pos.numel() < COMPILE_MIN_NUMEL
            or type(z_pos) is not torch.Tensor or type(z_neg) is not torch.Tensor
            or z_pos.dtype not in _FLOAT_DTYPES or z_neg.dtype != z_pos.dtype or z_neg.device != z_pos.device
            or not compile_enabled() or torch.jit.is_tracing() or _dispatch_mode_active()
            or (torch.is_grad_enabled() and (z_pos.requires_grad or z_neg.requires_grad))):
        return None
    kinds = tuple(isinstance(x, torch.Tensor) and (x.device.type, x.dtype, x.requires_grad)
                  for x in (scale, tau, alpha))
    if any(k and k[2] for k in kinds):
        return None
    # what torch._dynamo guards on besides shapes: one compiled graph per key
    key = (device, z_pos.dtype, norm, kinds, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           torch.get_num_threads() if device == "cpu" else 0)
    if key in _eager_variants or (key not in _variants and len(_variants) >= COMPILE_MAX_VARIANTS):
        return None
    return key


def _compiled_combine() -> Callable[..., torch.Tensor]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(combine_reference, dynamic=True, fullgraph=True)
    return _compiled


def _chunk_bounds(rows: int, width: int) -> list[int] | None:
    """Row boundaries ``[0, b1, …, rows]`` of the chunks for a ``(rows, width)`` combination, or None when it
    runs as one piece (at most :data:`CHUNK_NUMEL` elements). Chunks hold ``max(2, CHUNK_NUMEL // width)`` rows;
    a last chunk of one row joins the one before it (compiled code specializes on size 1)."""
    step = max(2, CHUNK_NUMEL // max(width, 1))
    if rows * width <= CHUNK_NUMEL or rows <= step:
        return None
    bounds = list(range(0, rows, step))
    if rows - bounds[-1] == 1:
        bounds.pop()
    return [*bounds, rows]


def _combine_into(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z_pos: torch.Tensor,
                  z_neg: torch.Tensor, out: torch.Tensor | None, bounds: list[int] | None,
                  fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``run`` (a combination of two ``(rows, C)`` tensors) over the chunks ``bounds`` of the flattened inputs,
    each chunk's result written into ``out`` (a new tensor when None). ``out`` may be ``z_pos`` itself: a chunk is
    read in full before its result is written. When ``run`` raises and ``fallback`` is given, ``fallback`` does the
    remaining chunks (the ones written stay: with ``out`` aliasing ``z_pos`` they could not be computed again) and
    the error is passed on as ``(result, error)`` through :class:`_Fallback`."""
    shape = z_pos.shape
    if bounds is None:  # one piece: no copy unless the result must land in ``out``
        try:
            result = run(z_pos, z_neg)
        except Exception as err:  # noqa: BLE001 - handed to the caller with the fallback's result
            if fallback is None:
                raise
            result = fallback(z_pos, z_neg)
            raise _Fallback(result if out is None else out.copy_(result), err) from err
        result = result.view(shape)
        return result if out is None else out.copy_(result)
    width = shape[-1] if len(shape) else 1
    zp, zn = z_pos.reshape(-1, width), z_neg.reshape(-1, width)
    target = out if out is not None else torch.empty(shape, dtype=z_pos.dtype, device=z_pos.device)
    direct = target.is_contiguous()
    flat = target.view(-1, width) if direct else torch.empty(zp.shape, dtype=target.dtype, device=target.device)
    error = None
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if error is None:
            try:
                flat[lo:hi] = run(zp[lo:hi], zn[lo:hi])
                continue
            except Exception as err:  # noqa: BLE001 - the remaining chunks go to the fallback
                if fallback is None:
                    raise
                error = err
        flat[lo:hi] = fallback(zp[lo:hi], zn[lo:hi])
    if not direct:
        target.copy_(flat.view(shape))
    if error is not None:
        raise _Fallback(target, error) from error
    return target


class _Fallback(Exception):  # noqa: N818 - internal: a result together with the error that made it fall back
    def __init__(self, result: torch.Tensor, error: Exception) -> None:
        super().__init__(str(error))
        self.result, self.error = result, error


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Number, tau: Number, alpha: Number,
                norm: str = "l1", out: torch.Tensor | None = None, method: str | None = None) -> torch.Tensor:
    """The NAG math without validation or identity shortcuts (the hot path used by the attention processors).

    Runs the compiled combination where it applies (see the module docstring), else the eager one; both compute
    :func:`combine_reference`'s formula (results agree to fp32 rounding, and bit for bit in the input dtype but for
    rare last-place differences in bf16/fp16). Inputs above :data:`CHUNK_NUMEL` elements are combined in chunks of
    whole tokens (same result bit for bit, a fraction of the temporaries' memory).

    Args:
        z_pos: attention output with the prompt, ``(..., C)``.
        z_neg: attention output with the negative prompt, same shape.
        scale, tau, alpha: as in :func:`nag`.
        norm: ``"l1"`` (paper) or ``"l2"`` (the official diffusers Flux processor).
        out: where to write the result (same shape and dtype as ``z_pos``; may be ``z_pos`` itself, which then
            holds the guided output and saves a full-size buffer), or None for a new tensor.

        method: the rule (``"nag"``, or ``"nasa"``: :func:`nasa_combine` with φ = ``scale``, ``tau``/``alpha``/``norm``
            unused); None: the guided forward's (:func:`current_method`). ``"vsf"`` is not a combination of ``Z+``
            and ``Z-`` (it changes the attention itself) and raises here.

    Returns:
        The guided output, same shape and dtype as ``z_pos`` (``out`` when given).
    """
    method = _METHOD[0] if method is None else method
    if method != "nag":
        if method == "nasa":
            return nasa_combine(z_pos, z_neg, scale, out)
        raise NotImplementedError(
            f"method={method!r} cannot be computed from the two attention outputs Z+ and Z- this attention layer "
            "produces: it needs nagkit's joint/cross-attention kernels (nagkit.kernels); this family's NAG processor "
            "computes its attention itself. Use method='nag' or 'nasa' for it")
    if torch.compiler.is_compiling():  # an outer torch.compile: trace the functional math into its graph
        result = combine_reference(z_pos, z_neg, scale, tau, alpha, norm)
        return result if out is None else out.copy_(result)
    plain = type(z_pos) is torch.Tensor and type(z_neg) is torch.Tensor and z_pos.device.type != "meta"
    width = z_pos.shape[-1] if z_pos.ndim else 1
    bounds = _chunk_bounds(z_pos.numel() // max(width, 1), width) if plain and z_pos.ndim else None

    def eager(zp: torch.Tensor, zn: torch.Tensor) -> torch.Tensor:
        return combine_eager(zp, zn, scale, tau, alpha, norm)

    key = _compiled_variant(z_pos, z_neg, scale, tau, alpha, norm)
    if key is not None:
        args = [float(x) if isinstance(x, (int, float)) else x for x in (scale, tau, alpha)]
        fn = None

        def compiled(zp: torch.Tensor, zn: torch.Tensor) -> torch.Tensor:
            nonlocal fn
            if fn is None:
                fn = _compiled_combine()
                _variants.add(key)
            # tokens flattened to one dim (a view for the usual contiguous inputs): a batch of 1 vs 2 would
            # otherwise compile twice (sizes 0 and 1 are always specialized); detached, so that no guard is put on
            # the view's base
            return fn(zp.flatten(0, -2).detach(), zn.flatten(0, -2).detach(), *args, norm)

        try:
            return _combine_into(compiled, z_pos, z_neg, out, bounds, fallback=eager)
        except _Fallback as fell:  # a failure to compile or run compiled code: eager from now on
            err = fell.error
            why = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if "limit" in type(err).__name__.lower():  # torch._dynamo's recompile limit: this variant stays eager
                _variants.discard(key)
                _eager_variants.add(key)
            else:
                _broken[key[0]] = f"{type(err).__name__}: {why}"
            _log.debug("nagkit: compiled NAG combination unavailable for %s, using eager (%s: %s)", key,
                       type(err).__name__, why)
            return fell.result
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in (z_pos, z_neg, scale, tau, alpha)):
        result = combine_reference(z_pos, z_neg, scale, tau, alpha, norm)  # differentiable (no in-place, no out=)
        return result if out is None else out.copy_(result)
    return _combine_into(eager, z_pos, z_neg, out, bounds)


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
    out = nag_combine(z_pos, z_neg, scale, tau, alpha, norm, method="nag")
    if isinstance(scale, torch.Tensor) or isinstance(alpha, torch.Tensor):
        on = torch.as_tensor(scale > 1, device=z_pos.device) & torch.as_tensor(alpha != 0, device=z_pos.device)
        out = torch.where(on, out, z_pos)
    return out
