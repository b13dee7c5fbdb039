"""ComfyUI glue for NAG: how a patched ``MODEL`` carries the negative through ComfyUI's patch points.

Nothing here imports ComfyUI: the glue talks to the few ComfyUI interfaces it uses (a model patcher's ``clone``,
``model_options``, ``set_model_patch_replace``, ``set_model_patch``, ``add_wrapper_with_key`` /
``remove_wrappers_with_key``, ``get_model_object``; the wrapper and attention-override call conventions) by duck
typing, so the CI tests exercise it against a small fake of those interfaces.

Mechanism (one guided model call):

* An ``APPLY_MODEL`` wrapper (one signature for every model) is the per-call gate. It finds the conditional rows of
  the batch from ``transformer_options["cond_or_uncond"]`` (ComfyUI labels the positive 0 and batches
  ``[uncond, cond]`` when both share a call), checks the sigma window, and stores a fresh :class:`CallState` in a
  *copy* of ``transformer_options``. Calls without conditional rows, outside the window or at ``nag_scale ≤ 1`` run
  untouched.
* Per family, patches that only act when that state is present carry the negative through the model:

  - MM-DiT (FLUX.1 / FLUX.2 / Chroma, SD3, Qwen-Image, HunyuanVideo): ``dit`` block replaces append the negative's text
    tokens to the text stream
    (``[Tp | Tn]``, embedded once per call with the model's own text-in layer) and extend the RoPE table; the joint
    attention ``[Tp | Tn | I]`` is then split by an ``optimized_attention_override``: prompt text and image tokens
    of every row attend exactly as before over ``[Tp | I]``, the negative's text attends over ``[Tn | I]``, and the
    image queries of the conditional rows get ``NAG(Z+, Z-)`` with ``Z-`` over ``[Tn | I]``. The image stream is
    never duplicated.
  - HiDream-I1 (no block replace in ComfyUI): the ``APPLY_MODEL`` wrapper appends the negative's T5 and Llama-3
    tokens to the model's own text inputs; the override permutes each joint attention to ``[I | Tp | Tn]`` and
    splits it as above (:class:`HiDreamFamily`).
  - Cross-attention (SD1.x/SDXL UNet through ``attn2_patch``, Wan through a ``dit`` block replace): the text
    context is extended along the sequence (``[pos | neg]``) and the override splits the keys again
    (:func:`nagkit.kernels.cross.nag_cross_attention`).

* Attention runs through ComfyUI's selected attention function and any override registered before this one
  (chained, never replaced); with no previous override, the joint split of the conditional rows uses nagkit's exact
  log-sum-exp merge (:func:`nagkit.kernels.joint.nag_joint_attention`), which computes image→image attention once.
* Never silently off: every patch that arms an attention checks that the override consumed it; a guided call whose
  patches ran but applied nothing, and a sampling step inside the window that saw no NAG application at all before
  the run's first application, raise :class:`NAGNotApplied` (or warn once, by option) naming the model class and
  the ComfyUI version. (Steps after the first guided one that never reach the model's blocks — cache nodes that skip
  the forward — are tolerated.)

No global state: everything lives in the patcher clone (wrappers, patch objects) or in per-call / per-step / per-run
objects placed in copies of the options dicts. Patch objects stored in ``model_options`` hold no tensors (clones
deep-copy ``model_options``); the negative lives on the wrapper object, which clones share read-only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: ComfyUI's wrapper types (``comfy.patcher_extension.WrappersMP``), by value.
APPLY_MODEL = "apply_model"
PREDICT_NOISE = "predict_noise"
OUTER_SAMPLE = "outer_sample"
#: Key of this pack's wrappers on a model patcher.
WRAPPER_KEY = "nagkit.nag"
#: Per-call state in ``transformer_options``.
STATE_KEY = "nagkit_nag_call"
#: Per-step and per-run ledgers in ``transformer_options``.
STEP_KEY = "nagkit_nag_step"
RUN_KEY = "nagkit_nag_run"
OVERRIDE = "optimized_attention_override"
ON_SILENT = ("error", "warn once")
ATTENTION_PATHS = ("auto", "comfy")

_log = logging.getLogger("nagkit.comfyui")


class NAGUnsupportedModel(ValueError):
    """The model's diffusion model is not a family this pack can patch."""


class NAGNotApplied(RuntimeError):
    """The model was patched but a guided step or call saw no NAG application."""


def comfy_version() -> str:
    """ComfyUI's version string (``comfyui_version.__version__``), or ``"unknown"`` outside ComfyUI."""
    try:
        import comfyui_version  # ComfyUI's root module

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001 - not running inside ComfyUI, or a fork without it
        return "unknown"


def unwrap(module: Any) -> Any:
    """The module behind ``torch.compile`` (``_orig_mod``) or other thin wrappers exposing ``_orig_mod``."""
    seen = 0
    while hasattr(module, "_orig_mod") and seen < 8:
        module = module._orig_mod
        seen += 1
    return module


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__name__} ({cls.__module__}.{cls.__qualname__})"


# ----------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class NAGSettings:
    """What one NAG node asks for.

    Attributes:
        scale: ``nag_scale`` = paper φ + 1 (``≤ 1`` is off).
        tau: cap τ on the per-token norm ratio.
        alpha: blend α.
        sigma_start: NAG is on while ``sigma_end ≤ sigma ≤ sigma_start`` (from the node's start/end percent).
        sigma_end: see ``sigma_start``.
        norm: ``"l1"`` (paper) or ``"l2"``.
        on_silent: ``"error"`` or ``"warn once"`` when a guided step saw no NAG application.
        attention: ``"auto"`` (nagkit's log-sum-exp split for MM-DiT conditional rows when no other attention
            override is registered) or ``"comfy"`` (every attention through ComfyUI's attention function).
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    norm: str = "l1"
    on_silent: str = "error"
    attention: str = "auto"

    def __post_init__(self) -> None:
        from nagkit.core.operator import NORMS, validate_params

        validate_params(float(self.scale), float(self.tau), float(self.alpha))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.on_silent not in ON_SILENT:
            raise ValueError(f"on_silent must be one of {ON_SILENT}, got {self.on_silent!r}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {self.attention!r}")
        if not self.sigma_end <= self.sigma_start:
            raise ValueError(f"the start of the NAG window must come before its end (sigma_start "
                             f"{self.sigma_start} < sigma_end {self.sigma_end})")

    @property
    def active(self) -> bool:
        return self.scale > 1 and self.alpha != 0

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


# ------------------------------------------------------------------------------------------------ ledgers
@dataclass
class RunLedger:
    """One sampling run (created by the ``OUTER_SAMPLE`` wrapper)."""

    negative: torch.Tensor | None = None
    applied: int = 0
    cache: dict = field(default_factory=dict)
    #: the negative's other conditioning tensors a family needs (HiDream: ``conditioning_llama3``)
    extras: dict = field(default_factory=dict)


@dataclass
class StepLedger:
    """One ``predict_noise`` call (created by the ``PREDICT_NOISE`` wrapper)."""

    calls: int = 0  # APPLY_MODEL calls seen
    armed: int = 0  # of those, calls with conditional rows inside the window
    entries: int = 0  # NAG patches that ran in the model's blocks
    applied: int = 0  # NAG attentions computed


@dataclass
class JointExpect:
    """A joint attention over ``[Tp | Tn | I]`` (text_first) or ``[I | Tp | Tn]`` the override should split.

    ``order`` (optional): the packed sequence is not in that layout but its permutation ``x[:, order]`` is (HiDream
    interleaves the prompt's and the negative's text segments); the output is permuted back. ``remaining``: how many
    attention calls of this shape to split before the expectation is consumed (HiDream arms every block at once)."""

    lp: int
    ln: int
    total: int
    text_first: bool
    where: str
    order: torch.Tensor | None = None
    remaining: int = 1
    #: armed before the model runs (not in a block): if none of the ``remaining`` attentions ran, the model's blocks
    #: did not run (a cache node reused an earlier output), which the per-step check judges, as for block patches
    whole_call: bool = False

    def __post_init__(self) -> None:
        self.calls = self.remaining


@dataclass
class CrossExpect:
    """A cross-attention whose keys are ``[pos | neg]`` (``lp + ln`` tokens) the override should split."""

    lp: int
    ln: int
    where: str
    #: armed before other attentions of the block ran (Wan: its self-attention comes first), so a call whose query
    #: length equals its key length is one of those, not this cross-attention
    skip_square: bool = True
    #: matching calls to let through first (Wan when its video tokens happen to number lp + ln: the self-attention
    #: then matches too, and comes first)
    skip: int = 0


class CallState:
    """State of one guided ``apply_model`` call (lives in that call's copy of ``transformer_options``)."""

    def __init__(self, patch: NAGPatch, dm: Any, rows: list[int], batch: int, negative: torch.Tensor,
                 context_len: int | None, run: RunLedger | None, extras: dict | None = None) -> None:
        self.patch = patch
        self.settings = patch.settings
        self.dm = dm
        self.rows = rows
        self.batch = batch
        self.raw_negative = negative
        self.raw_extras = extras or {}
        self.context_len = context_len
        self.run = run
        self.entries = 0
        self.applied = 0
        self.expect: JointExpect | CrossExpect | None = None
        self.cache: dict[str, Any] = {}

    # -- rows
    def row_slice(self) -> slice | None:
        """The conditional rows as a slice when they are contiguous, else None."""
        r = self.rows
        if r == list(range(r[0], r[-1] + 1)):
            return slice(r[0], r[-1] + 1)
        return None

    def other_rows(self) -> list[int]:
        chosen = set(self.rows)
        return [i for i in range(self.batch) if i not in chosen]

    # -- the negative
    def raw(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The raw negative embedding ``(n, L, C)`` (before the model's text-in layer) on ``device``/``dtype``,
        cast once per sampling run."""
        key = ("raw", device, dtype)
        store = self.run.cache if self.run is not None else self.cache
        out = store.get(key)
        if out is None:
            out = self.raw_negative.to(device=device, dtype=dtype)
            store[key] = out
        return out

    def raw_extra(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The negative's conditioning tensor ``name`` (e.g. HiDream's ``conditioning_llama3``) on
        ``device``/``dtype``, cast once per sampling run; None when the negative has none."""
        value = self.raw_extras.get(name)
        if value is None:
            return None
        key = ("extra", name, device, dtype)
        store = self.run.cache if self.run is not None else self.cache
        out = store.get(key)
        if out is None:
            out = value.to(device=device, dtype=dtype)
            store[key] = out
        return out

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """A per-negative tensor ``(n, ...)`` as one row per batch row of this call."""
        return batch_like(x, self.batch, self.batch // max(1, self.cache.get("chunks", 1)))

    # -- never silently off
    def arm(self, expect: JointExpect | CrossExpect) -> None:
        self.check_consumed()
        self.entries += 1
        self.expect = expect

    def check_consumed(self) -> None:
        if self.expect is not None:
            expect, where = self.expect, self.expect.where
            self.expect = None
            if isinstance(expect, JointExpect) and expect.whole_call and expect.remaining == expect.calls:
                return
            if isinstance(expect, JointExpect) and expect.calls > 1:
                where = f"{where} ({expect.remaining} of {expect.calls})"
            self.patch.report(f"the attention of {where} did not reach NAG's attention override (another patch may "
                              "have replaced it, or this ComfyUI version computes that attention differently)", self)


def batch_like(neg: torch.Tensor, batch: int, chunk: int) -> torch.Tensor:
    """``neg`` ``(n, L, C)`` as ``(batch, L, C)``: one negative for all rows, or one per latent of each chunk."""
    n = neg.shape[0]
    if n == 1:
        return neg.expand(batch, *neg.shape[1:])
    if chunk and chunk % n == 0 and batch % chunk == 0:
        return neg.repeat(batch // n, *([1] * (neg.ndim - 1)))
    raise ValueError(f"NAG: the NAG negative has batch {n}, which does not divide the latent batch {chunk}")


# -------------------------------------------------------------------------------------------- attention calls
_ATTN_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


class AttnCall:
    """One call of ComfyUI's attention ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs)``, remembering which arguments came positionally."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args = list(args)
        self.kwargs = dict(kwargs)

    def get(self, name: str, default: Any = None) -> Any:
        i = _ATTN_POSITIONAL.index(name)
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def replaced(self, **values: Any) -> tuple[list, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for name, value in values.items():
            i = _ATTN_POSITIONAL.index(name)
            if i < len(args):
                args[i] = value
            else:
                kwargs[name] = value
        return args, kwargs

    @property
    def q(self) -> torch.Tensor:
        return self.get("q")

    @property
    def k(self) -> torch.Tensor:
        return self.get("k")

    @property
    def v(self) -> torch.Tensor:
        return self.get("v")

    @property
    def heads(self) -> int:
        return int(self.get("heads"))

    @property
    def heads_first(self) -> bool:
        return bool(self.get("skip_reshape", False))

    @property
    def seq_dim(self) -> int:
        return 2 if self.heads_first else 1


def make_override(state: CallState, prev: Callable | None) -> Callable:
    """An ``optimized_attention_override`` that splits the attention ``state`` armed, chaining ``prev``."""

    def attention(func: Callable, call: AttnCall, **values: Any) -> torch.Tensor:
        args, kwargs = call.replaced(**values)
        if prev is not None:
            return prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
        expect = state.expect
        if expect is not None:
            call = AttnCall(args, kwargs)
            if isinstance(expect, JointExpect):
                if call.q.shape[call.seq_dim] == expect.total and call.k.shape[call.seq_dim] == expect.total:
                    if expect.whole_call and expect.remaining == expect.calls:
                        state.entries += 1
                    expect.remaining -= 1
                    if expect.remaining <= 0:
                        state.expect = None
                    fast = prev is None and state.settings.attention == "auto"
                    if expect.order is None:
                        out = joint_attention(state, expect, call, lambda **v: attention(func, call, **v), fast)
                    else:
                        out = permuted_joint_attention(state, expect, call, func, attention, fast)
                    state.applied += 1
                    return out
            elif call.k.shape[call.seq_dim] == expect.lp + expect.ln:
                square = call.q.shape[call.seq_dim] == call.k.shape[call.seq_dim]
                if expect.skip:
                    expect.skip -= 1
                elif not (expect.skip_square and square):
                    state.expect = None
                    out = cross_attention(state, expect, call, lambda **v: attention(func, call, **v))
                    state.applied += 1
                    return out
        if prev is not None:
            return prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    override.nagkit = True  # type: ignore[attr-defined]
    return override


def _merged(x: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """Attention output as ``(B, L, H·D)`` whatever ``skip_output_reshape`` produced."""
    if x.ndim == 4:
        return x.transpose(1, 2).flatten(2) if heads_first else x.flatten(2)
    return x


def _finish(out: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """``(B, L, H·D)`` back to the layout the caller asked for."""
    if call.get("skip_output_reshape", False):
        return out.unflatten(2, (call.heads, -1)).transpose(1, 2)
    return out


def _index(x: torch.Tensor, rows: list[int] | slice) -> torch.Tensor:
    if isinstance(rows, slice):
        return x[rows]
    return x[torch.tensor(rows, device=x.device)]


def joint_attention(state: CallState, expect: JointExpect, call: AttnCall, attend: Callable[..., torch.Tensor],
                    fast: bool) -> torch.Tensor:
    """NAG joint attention over the packed ``[Tp | Tn | I]`` / ``[I | Tp | Tn]`` sequence of one call."""
    from nagkit.core.operator import nag_combine

    if call.get("mask") is not None:
        raise NAGUnsupportedModel("NAG: joint attention with an attention mask (regional prompting masks, "
                                  f"masked text) is not supported yet ({expect.where})")
    q, k, v = call.q, call.k, call.v
    d = call.seq_dim
    lp, ln, total = expect.lp, expect.ln, expect.total
    li = total - lp - ln
    if expect.text_first:
        sp, sn, si = slice(0, lp), slice(lp, lp + ln), slice(lp + ln, total)
    else:
        si, sp, sn = slice(0, li), slice(li, li + lp), slice(li + lp, total)

    def seg(x: torch.Tensor, s: slice) -> torch.Tensor:
        return x.narrow(d, s.start, s.stop - s.start)

    def main_order(x: torch.Tensor, text: slice) -> torch.Tensor:  # the model's own order, one text segment
        return torch.cat([seg(x, text), seg(x, si)] if expect.text_first else [seg(x, si), seg(x, text)], dim=d)

    p = state.settings
    rows, others = state.rows, state.other_rows()
    batch = q.shape[0]
    hf = call.heads_first

    # prompt text + image of every row: exactly the unpatched attention over [Tp | I]
    def plain(sub: list[int] | slice) -> torch.Tensor:
        qs, ks, vs = (_index(x, sub) for x in (q, k, v))
        return _merged(attend(q=main_order(qs, sp), k=main_order(ks, sp), v=main_order(vs, sp),
                              skip_output_reshape=False), hf)

    def assemble(main: torch.Tensor, neg_text: torch.Tensor) -> torch.Tensor:
        """``main`` over ``[Tp | I]`` (or ``[I | Tp]``) plus the negative text's outputs, in packed order."""
        if expect.text_first:
            return torch.cat([main[:, :lp], neg_text, main[:, lp:]], dim=1)
        return torch.cat([main, neg_text], dim=1)

    if fast and not others:
        # every row guided (cfg 1, or a call without uncond rows): nagkit's exact log-sum-exp split computes the
        # image->image attention once for Z+ and Z-. With uncond rows in the call, their attention must stay the same
        # batched call as the unpatched model's (attention kernels are not bit-identical across batch sizes), and
        # the split below costs the same.
        from nagkit.core.state import Packing
        from nagkit.kernels.joint import nag_joint_attention

        def heads_first(x: torch.Tensor) -> torch.Tensor:
            return x if hf else x.reshape(x.shape[0], x.shape[1], call.heads, -1).transpose(1, 2)

        qc, kc, vc = (heads_first(x) for x in (q, k, v))
        guided = nag_joint_attention(qc, kc, vc, Packing(lp, ln, slice(0, batch), batch), expect.text_first,
                                     p.scale, p.tau, p.alpha, p.norm, backend="native").to(q.dtype)
        return _finish(guided, call)

    # through ComfyUI's attention (and any previous override): Z+ for every row in one call, then the negative's
    # text queries and the conditional image queries over [Tn | I] in a second one
    main = plain(slice(None))
    qc = _index(q, rows)
    kn, vn = (main_order(_index(x, rows), sn) for x in (k, v))
    qn = torch.cat([seg(qc, sn), seg(qc, si)], dim=d)
    neg = _merged(attend(q=qn, k=kn, v=vn, skip_output_reshape=False), hf)
    neg_text_c, z_neg = neg[:, :ln], neg[:, ln:]
    image = slice(lp, None) if expect.text_first else slice(0, li)
    main_c = _index(main, rows)
    guided = nag_combine(main_c[:, image], z_neg, p.scale, p.tau, p.alpha, p.norm)
    if expect.text_first:
        out_c = torch.cat([main_c[:, :lp], neg_text_c, guided], dim=1)
    else:
        out_c = torch.cat([guided, main_c[:, li:], neg_text_c], dim=1)
    if not others:
        return _finish(out_c, call)
    out = q.new_empty(batch, total, main.shape[2])
    out[torch.tensor(rows, device=q.device)] = out_c
    main_u = _index(main, others)
    out[torch.tensor(others, device=q.device)] = assemble(main_u, main_u.new_zeros(main_u.shape[0], ln,
                                                                                   main_u.shape[2]))
    return _finish(out, call)


def permuted_joint_attention(state: CallState, expect: JointExpect, call: AttnCall, func: Callable,
                             attention: Callable, fast: bool) -> torch.Tensor:
    """:func:`joint_attention` on a packed sequence whose permutation ``expect.order`` is ``[I | Tp | Tn]``: keys are
    permuted with their queries (softmax attention without a mask does not depend on the key order), the output is
    permuted back. The prompt's segments keep their relative order, so ``[I | Tp]`` is the unpatched sequence."""
    order = expect.order.to(call.q.device)
    d = call.seq_dim
    q, k, v = (x.index_select(d, order) for x in (call.q, call.k, call.v))
    args, kwargs = call.replaced(q=q, k=k, v=v)
    permuted = AttnCall(tuple(args), kwargs)
    out = joint_attention(state, expect, permuted, lambda **v: attention(func, permuted, **v), fast)
    out_dim = 2 if call.get("skip_output_reshape", False) else 1
    return out.index_select(out_dim, torch.argsort(order))


def cross_attention(state: CallState, expect: CrossExpect, call: AttnCall,
                    attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """NAG cross-attention whose keys/values are ``[pos | neg]`` along the sequence."""
    from nagkit.core.state import Packing
    from nagkit.kernels.cross import nag_cross_attention

    p = state.settings
    hf = call.heads_first
    mask = call.get("mask")

    def attend_merged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return _merged(attend(q=q, k=k, v=v, mask=m, skip_output_reshape=False), hf)

    q, k, v = call.q, call.k, call.v
    if mask is not None and mask.shape[-1] != expect.lp + expect.ln:
        raise NAGUnsupportedModel(f"NAG: a cross-attention mask of shape {tuple(mask.shape)} does not cover the "
                                  f"packed text ({expect.where})")
    rows = state.row_slice()
    if rows is not None:
        out = nag_cross_attention(attend_merged, q, k, v, mask, Packing(expect.lp, expect.ln, rows, q.shape[0]),
                                  p.scale, p.tau, p.alpha, p.norm, seq_dim=call.seq_dim)
        return _finish(out, call)
    # conditional rows not contiguous: Z+ for every row in one call (as unpatched), Z- for the conditional rows
    from nagkit.core.operator import nag_combine
    from nagkit.kernels.cross import split_text

    packing = Packing(expect.lp, expect.ln, slice(0, q.shape[0]), q.shape[0])
    (k_pos, k_neg), (v_pos, v_neg) = (split_text(x, packing, call.seq_dim) for x in (k, v))
    m_pos, m_neg = split_text(mask, packing, -1)
    c = state.rows

    def sub(x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None or x.shape[0] == 1 else _index(x, c)

    z_pos = attend_merged(q, k_pos, v_pos, m_pos)
    z_neg = attend_merged(_index(q, c), sub(k_neg), sub(v_neg), sub(m_neg))
    out = z_pos.clone()
    index = torch.tensor(c, device=q.device)
    out[index] = nag_combine(z_pos[index], z_neg, p.scale, p.tau, p.alpha, p.norm)
    return _finish(out, call)


# ------------------------------------------------------------------------------------------------- the patch
class NAGPatch:
    """The NAG settings and negative of one node execution, and the wrappers registered on the patched clone.

    Shared (read-only) by later clones of the patched model; per-call, per-step and per-run state never lives here.
    """

    def __init__(self, settings: NAGSettings, negative: torch.Tensor | None, family: Family, model_name: str,
                 extras: dict | None = None) -> None:
        self.settings = settings
        self.negative = None if negative is None else negative.detach()
        self.extras = {k: v.detach() for k, v in (extras or {}).items()}
        self.family = family
        self.model_name = model_name
        self._warned = False

    # -- reporting
    def report(self, what: str, state: CallState | None = None) -> None:
        message = (f"NAG was enabled on this model but {what}. NAG is not working on this model: model "
                   f"{self.model_name}, family {self.family.label}, ComfyUI {comfy_version()}, nagkit "
                   f"{_nagkit_version()}. Please report it; set on_silent='warn once' to sample without NAG.")
        if self.settings.on_silent == "error":
            raise NAGNotApplied(message)
        if not self._warned:
            self._warned = True
            _log.warning(message)

    # -- OUTER_SAMPLE: one run
    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.settings.active:
            return executor(*args, **kwargs)
        guider = getattr(executor, "class_obj", None)
        options = getattr(guider, "model_options", None)
        if not isinstance(options, dict):
            return executor(*args, **kwargs)
        if self.negative is not None:
            run = RunLedger(negative=self.negative, extras=self.extras)
        else:
            run = RunLedger(negative=cfg_negative(guider), extras=cfg_negative_extras(guider, self.family.extras))
        to = options.setdefault("transformer_options", {})
        previous = to.get(RUN_KEY)
        to[RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            if previous is None:
                to.pop(RUN_KEY, None)
            else:
                to[RUN_KEY] = previous

    # -- PREDICT_NOISE: one step
    def predict_noise_wrapper(self, executor: Any, x: torch.Tensor, timestep: Any, model_options: dict | None = None,
                              seed: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not self.settings.active or not isinstance(model_options, dict):
            return executor(x, timestep, model_options, seed, *args, **kwargs)
        step = StepLedger()
        options = dict(model_options)
        to = dict(options.get("transformer_options", {}))
        to[STEP_KEY] = step
        options["transformer_options"] = to
        run = to.get(RUN_KEY)
        before = run.applied if run is not None else 0
        out = executor(x, timestep, options, seed, *args, **kwargs)
        sigma = _first(timestep)
        if sigma is not None and self.settings.in_window(sigma) and step.applied == 0 and before == 0:
            if step.calls == 0:
                self.report(f"the sampling step at sigma {sigma:.4g} never reached NAG's apply_model wrapper")
            elif step.armed > 0:
                self.report(f"the sampling step at sigma {sigma:.4g} ran the model {step.armed} time(s) with the "
                            "prompt inside the NAG window but never reached NAG's block patches (the model may "
                            "ignore patches_replace/attn2_patch in this ComfyUI version)")
        return out

    # -- APPLY_MODEL: one model call
    def apply_model_wrapper(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                            **kwargs: Any) -> Any:
        to = transformer_options if transformer_options is not None else {}
        step = to.get(STEP_KEY)
        if step is not None:
            step.calls += 1
        cou = list(to.get("cond_or_uncond", [0]))
        sigma = _first(to.get("sigmas", t))
        if not self.settings.active or 0 not in cou or sigma is None or not self.settings.in_window(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if x.shape[0] % len(cou):
            self.report(f"a model call's batch ({x.shape[0]}) does not split into its {len(cou)} conditionings")
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        chunk = x.shape[0] // len(cou)
        rows = [i * chunk + j for i, c in enumerate(cou) if c == 0 for j in range(chunk)]
        run = to.get(RUN_KEY)
        negative = self.negative if self.negative is not None else (run.negative if run is not None else None)
        extras = self.extras if self.negative is not None else (run.extras if run is not None else {})
        if negative is None:
            raise ValueError("NAG: no NAG negative: connect nag_negative on the NAG node, or sample with a negative "
                             "conditioning that NAG can reuse")
        base = getattr(executor, "class_obj", None)
        dm = unwrap(getattr(base, "diffusion_model", None))
        context_len = None
        if isinstance(c_crossattn, torch.Tensor) and c_crossattn.ndim == 3:
            context_len = c_crossattn.shape[1]
            if negative.shape[-1] != c_crossattn.shape[-1]:
                raise ValueError(f"NAG: the NAG negative has width {negative.shape[-1]} but the model's text "
                                 f"conditioning has {c_crossattn.shape[-1]}: encode the NAG negative with the text "
                                 "encoder used for the prompt")
        state = CallState(self, dm, rows, x.shape[0], negative, context_len, run, extras)
        state.cache["chunks"] = len(cou)
        state.cache["x_shape"] = tuple(x.shape)
        self.family.prepare_call(state, base, t)
        c_crossattn, kwargs = self.family.extend_call(state, x, c_crossattn, kwargs)
        options = dict(to)
        options[STATE_KEY] = state
        if self.family.call_override:
            options[OVERRIDE] = make_override(state, options.get(OVERRIDE))
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        state.check_consumed()
        if step is not None:
            step.armed += 1
            step.entries += state.entries
            step.applied += state.applied
        if run is not None:
            run.applied += state.applied
        if state.entries and not state.applied:
            self.report("a guided model call ran NAG's block patches but no attention was guided", state)
        return out


def _nagkit_version() -> str:
    try:
        import nagkit

        return nagkit.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _first(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def cfg_negative_extras(guider: Any, names: tuple[str, ...]) -> dict:
    """The guider's CFG negative's other conditioning tensors ``names`` (first entry), to reuse with it."""
    if not names:
        return {}
    conds = getattr(guider, "original_conds", None) or {}
    entries = [c for c in conds.get("negative") or [] if isinstance(c, dict) and c.get("cross_attn") is not None]
    if not entries:
        return {}
    return {n: entries[0][n] for n in names if isinstance(entries[0].get(n), torch.Tensor)}


def cfg_negative(guider: Any) -> torch.Tensor | None:
    """The guider's CFG negative text embedding (first entry), to reuse as the NAG negative."""
    conds = getattr(guider, "original_conds", None) or {}
    entries = conds.get("negative") or []
    tensors = [c.get("cross_attn") for c in entries if isinstance(c, dict) and c.get("cross_attn") is not None]
    if not tensors:
        return None
    if len(tensors) > 1:
        _log.warning("NAG: the negative conditioning has %d entries; NAG reuses the first", len(tensors))
    return tensors[0]


# --------------------------------------------------------------------------------------------------- families
class Family:
    """How NAG reaches one architecture's attention."""

    name = "?"
    label = "?"
    preset = "flux"
    #: install the attention override per model call (UNet) rather than per block
    call_override = False
    #: other conditioning tensors of the NAG negative this family needs (names in ComfyUI's conditioning dict)
    extras: tuple[str, ...] = ()

    def matches(self, dm: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def install(self, patcher: Any, dm: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def preset_for(self, dm: Any) -> str:
        return self.preset

    def prepare_call(self, state: CallState, base: Any, t: torch.Tensor) -> None:
        """Per guided call, before the model runs (``base``: ComfyUI's ``BaseModel``, ``t``: its sigmas)."""

    def extend_call(self, state: CallState, x: torch.Tensor, c_crossattn: Any, kwargs: dict) -> tuple[Any, dict]:
        """Per guided call: the model inputs, possibly extended with the negative (families without block replaces
        carry the negative in the model's own text inputs)."""
        return c_crossattn, kwargs


def _has(obj: Any, *names: str) -> bool:
    return all(hasattr(obj, n) for n in names)


def _replaces(patcher: Any) -> dict:
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def install_block_replaces(patcher: Any, kind: str, count: int, make: Callable[[int, Any], Any]) -> None:
    """Register ``make(i, previous)`` as the ``dit`` replace of ``(kind, i)``, chaining an existing replace
    (another pack's) and replacing an earlier NAG one."""
    existing = _replaces(patcher)
    for i in range(count):
        previous = existing.get((kind, i))
        if getattr(previous, "nagkit", False):
            previous = previous.previous
        patcher.set_model_patch_replace(make(i, previous), "dit", kind, i)


class BlockReplace:
    """Base of the ``dit`` block replaces: holds no tensors (clones deep-copy ``model_options``)."""

    nagkit = True

    def __init__(self, kind: str, index: int, previous: Any) -> None:
        self.kind = kind
        self.index = index
        self.previous = previous

    def call_block(self, args: dict, extra: dict) -> dict:
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def where(self) -> str:
        return f"{self.kind} {self.index}"

    def __call__(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        state = to.get(STATE_KEY)
        if state is None:
            return self.call_block(args, extra)
        return self.guided(state, args, extra)

    def guided(self, state: CallState, args: dict, extra: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_armed(self, state: CallState, args: dict, extra: dict, expect: JointExpect | CrossExpect) -> dict:
        to = dict(args.get("transformer_options") or {})
        to[OVERRIDE] = make_override(state, to.get(OVERRIDE))
        state.arm(expect)
        out = self.call_block(dict(args, transformer_options=to), extra)
        state.check_consumed()
        return out


def _extend_pe(pe: torch.Tensor | None, lp: int, ln: int) -> torch.Tensor | None:
    """Flux-style RoPE table ``(B|1, 1, L, ...)`` over ``[txt; img]`` with ``ln`` rows for the negative's text
    inserted after the prompt's: FLUX.1/Chroma give every text token position 0, so the negative's tokens get the
    first text token's rotation."""
    if pe is None:
        return None
    neg = pe[:, :, :1].expand(*pe.shape[:2], ln, *pe.shape[3:])
    return torch.cat([pe[:, :, :lp], neg, pe[:, :, lp:]], dim=2)


#: FLUX.2's text length: ComfyUI's FLUX.2 model (``model_base.Flux2.extra_conds``) left-pads a shorter text
#: conditioning with zero tokens to this length before the model sees it; the NAG negative is padded the same way.
FLUX2_TEXT_LEN = 512


def flux_text_ids_dims(dm: Any) -> list[int]:
    """The RoPE axes on which a FLUX-class model numbers its text tokens ``0, 1, …`` (``params.txt_ids_dims``:
    FLUX.2 ``[3]``; FLUX.1/Chroma: none, every text token at position 0)."""
    return [int(i) for i in (getattr(getattr(dm, "params", None), "txt_ids_dims", None) or [])]


def is_flux2(dm: Any) -> bool:
    """FLUX.2 (dev, Klein): a FLUX-class model with global modulation (one modulation for all blocks)."""
    return bool(getattr(getattr(dm, "params", None), "global_modulation", False))


def flux_negative_text(dm: Any, raw: torch.Tensor, lp: int) -> torch.Tensor:
    """The negative's raw text conditioning as the model's own conditioning code would hand it over for a prompt:
    FLUX.2 left-pads it with zeros to :data:`FLUX2_TEXT_LEN` tokens (only when the prompt's call shows that padding,
    i.e. the prompt has at least that many tokens)."""
    if is_flux2(dm) and raw.shape[1] < FLUX2_TEXT_LEN <= lp:
        raw = torch.nn.functional.pad(raw, (0, 0, FLUX2_TEXT_LEN - raw.shape[1], 0))
    return raw


def flux_negative_pe(dm: Any, pe: torch.Tensor | None, lp: int, ln: int) -> torch.Tensor | None:
    """RoPE table over ``[Tp | Tn | I]``: the negative's ``ln`` text rows are the rows it would have as the prompt
    (positions ``0 … ln-1`` on the model's text axes, 0 elsewhere: FLUX.1/Chroma all 0, FLUX.2 numbered), computed
    with the model's own ``pe_embedder`` and checked against the prompt's rows where they overlap."""
    if pe is None:
        return None
    dims = flux_text_ids_dims(dm)
    if not dims:
        return _extend_pe(pe, lp, ln)
    axes = len(dm.params.axes_dim)
    ids = torch.zeros(pe.shape[0], ln, axes, device=pe.device, dtype=torch.float32)
    for i in dims:
        ids[:, :, i] = torch.arange(ln, device=pe.device, dtype=torch.float32)
    rows = dm.pe_embedder(ids).to(pe.dtype)
    n = min(lp, ln)
    if rows.shape[:2] != pe.shape[:2] or rows.shape[3:] != pe.shape[3:] or not torch.allclose(
            rows[:, :, :n], pe[:, :, :n], rtol=1e-4, atol=1e-5):
        raise NAGNotApplied(f"NAG: the FLUX text positions of this ComfyUI version ({comfy_version()}) differ from "
                            f"the ones NAG computes for the negative; model {class_path(dm)}. Please report it.")
    return torch.cat([pe[:, :, :lp], rows, pe[:, :, lp:]], dim=2)


class FluxDouble(BlockReplace):
    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        txt, img = args["txt"], args["img"]
        flux = state.cache.get("flux")
        if flux is None:  # first guided double block of this call: embed the negative's text once
            dm = state.dm
            lp = txt.shape[1]
            raw = flux_negative_text(dm, state.raw(txt.device, txt.dtype), lp)
            if getattr(dm, "txt_norm", None) is not None:  # FLUX.2 variants that normalise the text first
                raw = dm.txt_norm(raw)
            neg = state.batched(dm.txt_in(raw))
            ln = neg.shape[1]
            flux = {"lp": lp, "ln": ln, "pe": flux_negative_pe(dm, args.get("pe"), lp, ln)}
            state.cache["flux"] = flux
            txt = torch.cat([txt, neg.to(txt.dtype)], dim=1)
        lp, ln = flux["lp"], flux["ln"]
        if txt.shape[1] != lp + ln:
            state.patch.report(f"{self.where()} received {txt.shape[1]} text tokens instead of {lp} + {ln}")
            return self.call_block(args, extra)
        if args.get("attn_mask") is not None:
            raise NAGUnsupportedModel("NAG: FLUX/Chroma attention masks (regional prompting) are not supported yet")
        expect = JointExpect(lp, ln, txt.shape[1] + img.shape[1], True, f"double block {self.index}")
        return self.run_armed(state, dict(args, txt=txt, pe=flux["pe"]), extra, expect)


class FluxSingle(BlockReplace):
    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        flux = state.cache.get("flux")
        if flux is None:
            state.patch.report(f"{self.where()} ran before any guided double block")
            return self.call_block(args, extra)
        if args.get("attn_mask") is not None:
            raise NAGUnsupportedModel("NAG: FLUX/Chroma attention masks (regional prompting) are not supported yet")
        x = args["img"]
        expect = JointExpect(flux["lp"], flux["ln"], x.shape[1], True, f"single block {self.index}")
        return self.run_armed(state, dict(args, pe=flux["pe"]), extra, expect)


class FluxFamily(Family):
    name = "flux"
    label = "FLUX.1 / FLUX.2 (incl. Klein) / Chroma (MM-DiT, dit block replace)"
    preset = "flux"

    def matches(self, dm: Any) -> bool:
        if not _has(dm, "double_blocks", "single_blocks", "txt_in", "img_in"):
            return False
        blocks = list(dm.double_blocks)
        if not blocks or getattr(blocks[0], "flipped_img_txt", False):  # HunyuanVideo: image-first, token refiner
            return False
        return isinstance(dm.txt_in, torch.nn.Linear) or type(dm.txt_in).__name__ == "Linear"

    def preset_for(self, dm: Any) -> str:
        if hasattr(dm, "distilled_guidance_layer"):
            return "chroma"
        return "flux2" if is_flux2(dm) else "flux"

    def install(self, patcher: Any, dm: Any) -> None:
        install_block_replaces(patcher, "double_block", len(dm.double_blocks),
                               lambda i, prev: FluxDouble("double_block", i, prev))
        install_block_replaces(patcher, "single_block", len(dm.single_blocks),
                               lambda i, prev: FluxSingle("single_block", i, prev))


class SD3Joint(BlockReplace):
    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        txt, img = args["txt"], args["img"]
        sd3 = state.cache.get("sd3")
        if txt is None:
            return self.call_block(args, extra)
        if sd3 is None:
            dm = state.dm
            raw = state.raw(txt.device, txt.dtype)
            if getattr(dm, "context_processor", None) is not None:
                raw = dm.context_processor(raw)
            neg = state.batched(dm.context_embedder(raw))
            if getattr(dm, "register_length", 0) > 0:
                reg = dm.register.to(neg).expand(neg.shape[0], -1, -1)
                neg = torch.cat([reg, neg], dim=1)
            sd3 = {"lp": txt.shape[1], "ln": neg.shape[1]}
            state.cache["sd3"] = sd3
            txt = torch.cat([txt, neg.to(txt.dtype)], dim=1)
        lp, ln = sd3["lp"], sd3["ln"]
        if txt.shape[1] != lp + ln:
            state.patch.report(f"{self.where()} received {txt.shape[1]} text tokens instead of {lp} + {ln}")
            return self.call_block(args, extra)
        expect = JointExpect(lp, ln, txt.shape[1] + img.shape[1], True, f"joint block {self.index}")
        return self.run_armed(state, dict(args, txt=txt), extra, expect)


class SD3Family(Family):
    name = "sd3"
    label = "SD3 / SD3.5 (MM-DiT, dit block replace)"
    preset = "sd3"

    def matches(self, dm: Any) -> bool:
        return _has(dm, "joint_blocks", "context_embedder", "x_embedder")

    def install(self, patcher: Any, dm: Any) -> None:
        install_block_replaces(patcher, "double_block", len(dm.joint_blocks),
                               lambda i, prev: SD3Joint("double_block", i, prev))


class WanBlock(BlockReplace):
    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        txt = args["txt"]
        wan = state.cache.get("wan")
        if wan is None or wan["src"] is not txt:
            if state.context_len is None:
                state.patch.report("a Wan call had no text context")
                return self.call_block(args, extra)
            neg = state.batched(state.dm.text_embedding(state.raw(txt.device, txt.dtype))).to(txt.dtype)
            wan = {"src": txt, "ext": torch.cat([txt, neg], dim=1), "lp": state.context_len, "ln": neg.shape[1]}
            state.cache["wan"] = wan
        lp, ln = wan["lp"], wan["ln"]
        expect = CrossExpect(lp, ln, f"block {self.index} (cross-attention)")
        if args["img"].shape[1] == lp + ln:  # the self-attention (first in the block) matches too: let it through
            expect = CrossExpect(lp, ln, expect.where, skip_square=False, skip=1)
        return self.run_armed(state, dict(args, txt=wan["ext"]), extra, expect)


class WanFamily(Family):
    name = "wan"
    label = "Wan 2.1 / 2.2 (T2V, I2V, VACE; dit block replace + cross-attention)"
    preset = "wan"

    def matches(self, dm: Any) -> bool:
        if not _has(dm, "blocks", "text_embedding", "patch_embedding"):
            return False
        blocks = list(dm.blocks)
        return bool(blocks) and hasattr(blocks[0], "cross_attn")

    def install(self, patcher: Any, dm: Any) -> None:
        install_block_replaces(patcher, "double_block", len(dm.blocks), lambda i, prev: WanBlock("double_block", i,
                                                                                                  prev))


def _qwen_text_pe(dm: Any, x_shape: tuple, length: int, batch: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """RoPE rows of ``length`` text tokens the way ComfyUI's Qwen-Image ``_forward`` builds them: positions
    ``txt_start + j`` on all three axes, ``txt_start`` from the latent's height and width (independent of the text)."""
    p = int(dm.patch_size)
    h, w = x_shape[-2], x_shape[-1]
    start = round(max(((w + p // 2) // p) // 2, ((h + p // 2) // p) // 2))
    ids = torch.arange(start, start + length, device=device, dtype=torch.float32)
    ids = ids.reshape(1, -1, 1).repeat(batch, 1, 3)
    return dm.pe_embedder(ids).squeeze(1).unsqueeze(2).to(dtype)


class QwenBlock(BlockReplace):
    """Qwen-Image (and Edit: reference latents are image tokens): text-first joint attention ``[Tp | Tn | I]``; the
    negative's text rows get the RoPE positions they would have as the prompt (``txt_start + j``)."""

    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        txt, img, pe = args["txt"], args["img"], args.get("pe")
        qwen = state.cache.get("qwen")
        if qwen is None:  # first guided block of this call: embed the negative's text once
            dm = state.dm
            if pe is None or "x_shape" not in state.cache:
                state.patch.report(f"{self.where()} received no RoPE table")
                return self.call_block(args, extra)
            raw = state.raw(txt.device, txt.dtype)
            neg = state.batched(dm.txt_in(dm.txt_norm(raw))).to(txt.dtype)
            lp, ln = txt.shape[1], neg.shape[1]
            pe_neg = _qwen_text_pe(dm, state.cache["x_shape"], ln, pe.shape[0], pe.device, pe.dtype)
            n = min(lp, ln)
            if not torch.allclose(pe_neg[:, :n], pe[:, :n], rtol=1e-4, atol=1e-5):
                raise NAGNotApplied(f"NAG: the Qwen-Image text positions of this ComfyUI version "
                                    f"({comfy_version()}) differ from the ones NAG computes for the negative; "
                                    f"model {class_path(dm)}. Please report it.")
            qwen = {"lp": lp, "ln": ln, "pe": torch.cat([pe[:, :lp], pe_neg, pe[:, lp:]], dim=1)}
            state.cache["qwen"] = qwen
            txt = torch.cat([txt, neg], dim=1)
        lp, ln = qwen["lp"], qwen["ln"]
        if txt.shape[1] != lp + ln:
            state.patch.report(f"{self.where()} received {txt.shape[1]} text tokens instead of {lp} + {ln}")
            return self.call_block(args, extra)
        expect = JointExpect(lp, ln, txt.shape[1] + img.shape[1], True, f"block {self.index}")
        return self.run_armed(state, dict(args, txt=txt, pe=qwen["pe"]), extra, expect)


class QwenFamily(Family):
    name = "qwen"
    label = "Qwen-Image / Qwen-Image-Edit (MM-DiT, dit block replace)"
    preset = "qwen-image"

    def matches(self, dm: Any) -> bool:
        if not _has(dm, "transformer_blocks", "txt_in", "txt_norm", "img_in", "pe_embedder", "patch_size"):
            return False
        blocks = list(dm.transformer_blocks)
        return bool(blocks) and _has(getattr(blocks[0], "attn", None), "add_q_proj", "to_q")

    def install(self, patcher: Any, dm: Any) -> None:
        install_block_replaces(patcher, "double_block", len(dm.transformer_blocks),
                               lambda i, prev: QwenBlock("double_block", i, prev))


class HunyuanDouble(BlockReplace):
    """HunyuanVideo: image-first joint attention ``[I | Tp | Tn]``. The token refiner (``txt_in``) mixes the text
    (a pooled text vector, self-attention over the tokens), so the negative is refined on its own, with the call's
    timesteps, as if it were the prompt; its text positions are 0 like every text token's."""

    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        txt, img = args["txt"], args["img"]
        hy = state.cache.get("hunyuan")
        if hy is None:  # first guided double block of this call: refine the negative's text once
            ts = state.cache.get("timesteps")
            if ts is None:
                state.patch.report("a HunyuanVideo call had no timesteps for the text refiner")
                return self.call_block(args, extra)
            raw = state.batched(state.raw(txt.device, txt.dtype))
            neg = state.dm.txt_in(raw, ts.to(txt.device), None,
                                  transformer_options=args.get("transformer_options") or {})
            lp, ln, li = txt.shape[1], neg.shape[1], img.shape[1]
            pe = args.get("pe")
            if pe is not None:  # text rows (all position 0) after the image's: the negative's rows are copies
                pe = torch.cat([pe, pe[:, :, li:li + 1].expand(*pe.shape[:2], ln, *pe.shape[3:])], dim=2)
            hy = {"lp": lp, "ln": ln, "pe": pe}
            state.cache["hunyuan"] = hy
            txt = torch.cat([txt, neg.to(txt.dtype)], dim=1)
        lp, ln = hy["lp"], hy["ln"]
        if txt.shape[1] != lp + ln:
            state.patch.report(f"{self.where()} received {txt.shape[1]} text tokens instead of {lp} + {ln}")
            return self.call_block(args, extra)
        if args.get("attention_mask") is not None:
            raise NAGUnsupportedModel("NAG: HunyuanVideo text attention masks (a padded prompt batch) are not "
                                      "supported yet")
        expect = JointExpect(lp, ln, img.shape[1] + txt.shape[1], False, f"double block {self.index}")
        return self.run_armed(state, dict(args, txt=txt, pe=hy["pe"]), extra, expect)


class HunyuanSingle(BlockReplace):
    def guided(self, state: CallState, args: dict, extra: dict) -> dict:
        hy = state.cache.get("hunyuan")
        if hy is None:
            state.patch.report(f"{self.where()} ran before any guided double block")
            return self.call_block(args, extra)
        if args.get("attention_mask") is not None:
            raise NAGUnsupportedModel("NAG: HunyuanVideo text attention masks (a padded prompt batch) are not "
                                      "supported yet")
        x = args["img"]
        expect = JointExpect(hy["lp"], hy["ln"], x.shape[1], False, f"single block {self.index}")
        return self.run_armed(state, dict(args, pe=hy["pe"]), extra, expect)


class HunyuanFamily(Family):
    name = "hunyuan"
    label = "HunyuanVideo (MM-DiT with a text token refiner, dit block replace)"
    preset = "flux"

    def matches(self, dm: Any) -> bool:
        if not _has(dm, "double_blocks", "single_blocks", "txt_in", "img_in"):
            return False
        blocks = list(dm.double_blocks)
        return bool(blocks) and getattr(blocks[0], "flipped_img_txt", False) and hasattr(
            dm.txt_in, "individual_token_refiner")

    def prepare_call(self, state: CallState, base: Any, t: torch.Tensor) -> None:
        sampling = getattr(base, "model_sampling", None)
        if sampling is not None and isinstance(t, torch.Tensor):  # what ComfyUI's BaseModel passes the model
            state.cache["timesteps"] = sampling.timestep(t).float()

    def install(self, patcher: Any, dm: Any) -> None:
        install_block_replaces(patcher, "double_block", len(dm.double_blocks),
                               lambda i, prev: HunyuanDouble("double_block", i, prev))
        install_block_replaces(patcher, "single_block", len(dm.single_blocks),
                               lambda i, prev: HunyuanSingle("single_block", i, prev))


HIDREAM_LLAMA = "encoder_hidden_states_llama3"  # the model's keyword argument
HIDREAM_LLAMA_COND = "conditioning_llama3"  # its name in the conditioning dict


def hidream_layout(li: int, a: int, b: int, c: int, d: int) -> torch.Tensor:
    """Permutation of HiDream's packed attention sequence to ``[I | Tp | Tn]``.

    With the T5 context extended to ``[T5p (a) | T5n (b)]`` and every Llama layer to ``[Lp (c) | Ln (d)]``, every
    joint attention of the model (dual-stream: image + block text; single-stream: one sequence) runs over
    ``[I (li) | T5p | T5n | Llast,p | Llast,n | Lk,p | Lk,n]`` (the carried "initial" text ``[T5, Llama_last]``, then
    block ``k``'s fresh Llama projection)."""
    t = li
    spans = {"p": [], "n": []}
    for length, who in ((a, "p"), (b, "n"), (c, "p"), (d, "n"), (c, "p"), (d, "n")):
        spans[who].append(torch.arange(t, t + length))
        t += length
    return torch.cat([torch.arange(li), *spans["p"], *spans["n"]])


class HiDreamFamily(Family):
    """HiDream-I1: ComfyUI's HiDream model has no block-replace patch point, so the negative rides in the model's own
    text inputs: for a guided call the ``APPLY_MODEL`` wrapper appends the negative's T5 tokens to the T5 context and
    its Llama-3 tokens to every Llama layer (text positions are all zero and the text has no mask, so where a token sits
    in the text does not matter), and the attention override splits every joint attention of the call (prompt text and
    image over ``[I | Tp]`` exactly as before, the negative's text over ``[I | Tn]``, the prompt rows' image queries
    ``NAG(Z+, Z-)``). Every other layer is per token (projections, norms, the mixture-of-experts feed-forward routes
    each token alone), the model cuts the carried text and the output back by lengths it reads from the inputs. The
    negative's text uses the prompt's pooled vector (one image stream)."""

    name = "hidream"
    label = "HiDream-I1 (dual/single-stream MM-DiT, text inputs extended + attention override)"
    preset = "hidream"
    call_override = True
    extras = (HIDREAM_LLAMA_COND,)

    def matches(self, dm: Any) -> bool:
        return _has(dm, "double_stream_blocks", "single_stream_blocks", "caption_projection", "llama_layers",
                    "x_embedder", "patch_size")

    def install(self, patcher: Any, dm: Any) -> None:
        """Nothing to register on the patcher: the ``APPLY_MODEL`` wrapper extends the inputs of guided calls."""

    def extend_call(self, state: CallState, x: torch.Tensor, c_crossattn: Any, kwargs: dict) -> tuple[Any, dict]:
        llama = kwargs.get(HIDREAM_LLAMA)
        if not isinstance(c_crossattn, torch.Tensor) or not isinstance(llama, torch.Tensor) or llama.ndim != 4:
            state.patch.report("a HiDream call had no T5 context or no Llama-3 states")
            return c_crossattn, kwargs
        neg_t5 = state.batched(state.raw(c_crossattn.device, c_crossattn.dtype))
        neg_llama = state.raw_extra(HIDREAM_LLAMA_COND, llama.device, llama.dtype)
        if neg_llama is None:
            raise ValueError("NAG: the NAG negative has no conditioning_llama3 (HiDream's Llama-3 states): encode it "
                             "with the HiDream text encoder used for the prompt")
        if neg_llama.ndim != 4 or neg_llama.shape[1] != llama.shape[1] or neg_llama.shape[-1] != llama.shape[-1]:
            raise ValueError(f"NAG: the NAG negative's Llama-3 states {tuple(neg_llama.shape)} do not match the "
                             f"prompt's {tuple(llama.shape)}: encode it with the text encoder used for the prompt")
        neg_llama = state.batched(neg_llama)
        p = int(state.dm.patch_size)
        h, w = x.shape[-2], x.shape[-1]
        image_cond = kwargs.get("image_cond")
        if isinstance(image_cond, torch.Tensor):  # concatenated along the width by the model
            w += image_cond.shape[-1]
        li = math.ceil(h / p) * math.ceil(w / p)
        a, b, c, d = c_crossattn.shape[1], neg_t5.shape[1], llama.shape[2], neg_llama.shape[2]
        blocks = len(state.dm.double_stream_blocks) + len(state.dm.single_stream_blocks)
        total = li + a + b + 2 * c + 2 * d
        state.check_consumed()
        state.expect = JointExpect(a + 2 * c, b + 2 * d, total, False, "HiDream's blocks",
                                   order=hidream_layout(li, a, b, c, d), remaining=blocks, whole_call=True)
        kwargs = dict(kwargs)
        kwargs[HIDREAM_LLAMA] = torch.cat([llama, neg_llama.to(llama.dtype)], dim=2)
        return torch.cat([c_crossattn, neg_t5.to(c_crossattn.dtype)], dim=1), kwargs


class UNetContext:
    """``attn2_patch``: the cross-attention context ``[pos | neg]`` for guided calls (holds no tensors)."""

    nagkit = True

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict) -> tuple:
        state = extra_options.get(STATE_KEY)
        if state is None or context is None or context.ndim != 3:
            return n, context, value
        neg = state.batched(state.raw(context.device, context.dtype))
        lp, ln = context.shape[1], neg.shape[1]
        ext = torch.cat([context, neg], dim=1)
        value = ext if value is context else torch.cat([value, neg], dim=1)
        where = f"UNet block {extra_options.get('block')} transformer {extra_options.get('transformer_index')}"
        state.arm(CrossExpect(lp, ln, where, skip_square=False))  # armed right before this cross-attention
        return n, ext, value


class UNetFamily(Family):
    name = "unet"
    label = "SD1.x / SD2.x / SDXL (UNet, attn2_patch + cross-attention)"
    preset = "sdxl"
    call_override = True

    def matches(self, dm: Any) -> bool:
        if not _has(dm, "input_blocks", "middle_block", "output_blocks"):
            return False
        return any(getattr(m, "attn2", None) is not None for m in dm.modules())

    def preset_for(self, dm: Any) -> str:
        return "sdxl" if getattr(dm, "adm_in_channels", None) or getattr(dm, "num_classes", None) == "sequential" \
            else "sd15"

    def install(self, patcher: Any, dm: Any) -> None:
        to = patcher.model_options.setdefault("transformer_options", {})
        patches = to.get("patches", {})
        kept = [p for p in patches.get("attn2_patch", []) if not getattr(p, "nagkit", False)]
        if len(kept) != len(patches.get("attn2_patch", [])):
            patches = dict(patches)
            patches["attn2_patch"] = kept
            to["patches"] = patches
        patcher.set_model_patch(UNetContext(), "attn2_patch")


FAMILIES: list[Family] = [FluxFamily(), SD3Family(), WanFamily(), UNetFamily(), QwenFamily(), HunyuanFamily(),
                          HiDreamFamily()]
#: Architectures recognised but refused, with why (checked before the error listing the supported families).
_REFUSED: list[tuple[Callable[[Any], bool], str]] = [
    (lambda dm: _has(dm, "layers", "cap_embedder"),
     "Lumina2 / Z-Image (ComfyUI's NextDiT) are not supported: no block-replace patch point in ComfyUI, and the "
     "image tokens' RoPE positions start after the caption's length in one caption+image sequence, so a NAG negative "
     "of another length would need image positions other than the prompt's"),
]


def supported_families() -> str:
    return "; ".join(f.label for f in FAMILIES)


def detect_family(dm: Any) -> Family:
    """The family of a diffusion model, by structure; raise :class:`NAGUnsupportedModel` otherwise."""
    dm = unwrap(dm)
    for family in FAMILIES:
        try:
            if family.matches(dm):
                return family
        except Exception:  # noqa: BLE001 - a foreign module with surprising attributes: not this family
            continue
    reason = next((why for test, why in _REFUSED if _safe(test, dm)), None)
    head = f"NAG does not support this model: {class_path(dm)}"
    if reason:
        head += f" ({reason})"
    raise NAGUnsupportedModel(f"{head}. Supported families: {supported_families()}.")


def _safe(test: Callable[[Any], bool], dm: Any) -> bool:
    try:
        return bool(test(dm))
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------------------------- entry point
def patch_model(model: Any, negative: torch.Tensor | None, settings: NAGSettings,
                extras: dict | None = None) -> Any:
    """A clone of ``model`` (a ComfyUI ``ModelPatcher``) with NAG installed; ``model`` is unchanged.

    Args:
        model: the model patcher.
        negative: the NAG negative's text embedding ``(n, L, C)``, or None to reuse the sampler's CFG negative.
        settings: the NAG settings.
        extras: the negative's other conditioning tensors the family needs (HiDream: ``conditioning_llama3``),
            by their name in ComfyUI's conditioning dict.

    Raises:
        NAGUnsupportedModel: the diffusion model is not a supported family (the message lists them).
    """
    dm = unwrap(model.get_model_object("diffusion_model"))
    family = detect_family(dm)
    extras = dict(extras or {})
    if negative is not None:
        if not isinstance(negative, torch.Tensor) or negative.ndim != 3:
            raise ValueError("NAG: the NAG negative must be a text embedding (batch, tokens, channels)")
        missing = [n for n in family.extras if not isinstance(extras.get(n), torch.Tensor)]
        if missing:
            raise ValueError(f"NAG: the NAG negative has no {', '.join(missing)}, which {family.label} needs: encode "
                             "it with the text encoder used for the prompt")
    m = model.clone()
    family.install(m, dm)
    patch = NAGPatch(settings, negative, family, class_path(dm), {n: extras[n] for n in family.extras if n in extras})
    for kind, wrapper in ((OUTER_SAMPLE, patch.outer_sample_wrapper), (PREDICT_NOISE, patch.predict_noise_wrapper),
                          (APPLY_MODEL, patch.apply_model_wrapper)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return m


def conditioning_tensor(conditioning: Any) -> torch.Tensor | None:
    """The text embedding of a ComfyUI ``CONDITIONING`` (``[[tensor, dict], ...]``), first entry; None for None."""
    if conditioning is None:
        return None
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("NAG: nag_negative is not a CONDITIONING")
    if len(conditioning) > 1:
        _log.warning("NAG: the NAG negative has %d conditioning entries; NAG uses the first (combine them with "
                     "ConditioningConcat to use all)", len(conditioning))
    first = conditioning[0]
    tensor = first[0] if isinstance(first, (list, tuple)) else None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError("NAG: nag_negative has no text embedding")
    return tensor


def conditioning_extras(conditioning: Any) -> dict:
    """The tensors in the first entry's dict of a ``CONDITIONING`` (e.g. HiDream's ``conditioning_llama3``)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        return {}
    first = conditioning[0]
    extra = first[1] if isinstance(first, (list, tuple)) and len(first) > 1 else None
    if not isinstance(extra, dict):
        return {}
    return {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------- node-level logic
#: Per-family defaults shown on the node widgets: label -> (nagkit preset, scale, tau, alpha); the CI tests check
#: the numbers against nagkit's presets.
FAMILY_DEFAULTS = {
    "FLUX.1 / Chroma": ("flux", 5.0, 2.5, 0.25),
    "SD3 / SD3.5": ("sd3", 5.0, 2.5, 0.125),
    "SDXL": ("sdxl", 3.0, 2.5, 0.5),
    "SD1.5": ("sd15", 3.0, 2.5, 0.5),
    "Wan 2.1/2.2": ("wan", 9.0, 2.5, 0.25),
    "Wan + CausVid (4 steps)": ("wan-causvid", 11.0, 3.5, 0.5),
    "Qwen-Image": ("qwen-image", 5.0, 2.5, 0.25),
    "HunyuanVideo (FLUX values by analogy)": ("flux", 5.0, 2.5, 0.25),
    "FLUX.2 / Klein (FLUX.1 values by analogy)": ("flux2", 5.0, 2.5, 0.25),
    "HiDream-I1 (FLUX values by analogy)": ("hidream", 5.0, 2.5, 0.25),
}
#: The ``preset`` choices of the nodes: ``custom`` (the widgets), ``auto`` (the detected family's nagkit preset), or
#: a named nagkit preset (:func:`nagkit.get_preset`).
PRESET_CHOICES = ("custom", "auto", "flux", "flux-kontext", "chroma", "sd3", "sdxl", "sd15", "wan", "wan-causvid",
                  "qwen-image", "flux2", "hidream")


def preset_values(name: str) -> tuple[float, float, float]:
    """``(scale, tau, alpha)`` of the nagkit preset ``name`` (the family modules register them on import)."""
    import nagkit
    import nagkit.adapters  # noqa: F401 - registers the family presets

    config = nagkit.get_preset(name)
    return float(config.scale), float(config.tau), float(config.alpha)


def percent_window(model: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """``(sigma_start, sigma_end)`` of a start/end percent window through the model's ``model_sampling``."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"NAG: need 0 <= start_percent <= end_percent <= 1, got {start_percent} and {end_percent}")
    sampling = model.get_model_object("model_sampling")
    sigma_start = math.inf if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = -math.inf if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    return sigma_start, sigma_end


def nag_model(model: Any, nag_negative: Any, nag_scale: float, nag_tau: float, nag_alpha: float,
              start_percent: float = 0.0, end_percent: float = 1.0, preset: str = "custom", on_silent: str = "error",
              attention: str = "auto") -> Any:
    """What the NAG node does: a patched clone of ``model`` (see :func:`patch_model`).

    Args:
        model: the ``MODEL`` (model patcher).
        nag_negative: a ``CONDITIONING`` for NAG, or None to reuse the sampler's CFG negative.
        nag_scale, nag_tau, nag_alpha: the NAG parameters (``preset="custom"``).
        start_percent, end_percent: the part of the schedule where NAG is on.
        preset: one of :data:`PRESET_CHOICES`; anything but ``custom`` replaces scale/tau/alpha.
        on_silent: ``"error"`` or ``"warn once"``.
        attention: ``"auto"`` or ``"comfy"`` (see :class:`NAGSettings`).
    """
    if preset not in PRESET_CHOICES:
        raise ValueError(f"NAG: unknown preset {preset!r}; choose one of {', '.join(PRESET_CHOICES)}")
    dm = unwrap(model.get_model_object("diffusion_model"))
    family = detect_family(dm)
    if preset != "custom":
        name = family.preset_for(dm) if preset == "auto" else preset
        nag_scale, nag_tau, nag_alpha = preset_values(name)
        _log.info("NAG: preset %s: scale %s, tau %s, alpha %s", name, nag_scale, nag_tau, nag_alpha)
    sigma_start, sigma_end = percent_window(model, start_percent, end_percent)
    settings = NAGSettings(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, sigma_start=sigma_start,
                           sigma_end=sigma_end, on_silent=on_silent, attention=attention)
    return patch_model(model, conditioning_tensor(nag_negative), settings, conditioning_extras(nag_negative))
