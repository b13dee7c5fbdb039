"""The denoiser hook: per call, decide whether NAG is on, pack the negative text after the positive one, and put NAG
processors over the guided attention modules' *current* processors for the duration of that forward only.

Between calls the model carries exactly its own processors, so every diffusers API that reads or replaces processors
(``set_default_attn_processor``, ``fuse_qkv_projections``, ``set_attn_processor``, attention slicing, IP-Adapter
loading, ``set_attention_backend``) works as without nagkit, and whatever processor a guided module has at call time
is the one NAG wraps — or, when NAG cannot split it, the call fails with an error naming the module and the processor
class before anything is packed.

It is a diffusers ``ModelHook`` (stateful, so pipelines' ``cache_context("cond"/"uncond")`` reaches it), installed
with diffusers' ``HookRegistry`` and removed without a trace (see :func:`install_hook` / :func:`uninstall_hook`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..core.operator import guidance_method
from ..core.state import NAGState, Negative, Packing
from .caches import LayoutTracker, register_innermost, remove_hook_safely, track_layout

if TYPE_CHECKING:
    from ..adapters.base import Adapter

HOOK_NAME = "nagkit"
UNCOND_CONTEXTS = frozenset({"uncond", "pred_uncond"})


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ArgAccess:
    """Read/replace a forward argument whether it came positionally or by keyword."""

    def __init__(self, forward: Any) -> None:
        params = list(inspect.signature(forward).parameters)
        self.index = {name: i - 1 for i, name in enumerate(params) if i > 0}  # drop ``self``

    def get(self, name: str, args: tuple, kwargs: dict) -> Any:
        i = self.index.get(name)
        if i is not None and i < len(args):
            return args[i]
        return kwargs.get(name)

    def set(self, name: str, value: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        i = self.index.get(name)
        if i is not None and i < len(args):
            args = args[:i] + (value,) + args[i + 1:]
        else:
            kwargs = {**kwargs, name: value}
        return args, kwargs


# ---------------------------------------------------------------------------------------------------- planning
def _timestep_value(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max())
    return float(t)


@torch.compiler.disable
def _in_window(adapter: Adapter, state: NAGState, t: Any) -> bool:
    return adapter.in_window(state.config, _timestep_value(t))


@torch.compiler.disable
def _same(text: torch.Tensor, positive: torch.Tensor) -> bool:
    return text.shape == positive.shape and torch.equal(text, positive.to(device=text.device, dtype=text.dtype))


@torch.compiler.disable
def _conditional_half(text: torch.Tensor, positive: torch.Tensor | None, rows: int) -> slice:
    """Rows of a batched-CFG call that hold the prompt: the half equal to the prompt embeddings.

    diffusers' classic pipelines stack ``[unconditional, conditional]``; that order is the fallback when both or
    neither half match (e.g. a CFG negative equal to the prompt).
    """
    if positive is not None:
        pos = positive.to(device=text.device, dtype=text.dtype)
        first, second = torch.equal(text[:rows], pos), torch.equal(text[rows:], pos)
        if first and not second:
            return slice(0, rows)
    return slice(rows, 2 * rows)


@torch.compiler.disable
def _drop_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative without the tokens every row masks out. Exact: masked keys get no attention weight, so a short
    negative padded to the encoder's length (Sana, PixArt: 300 tokens) costs only its own tokens."""
    if mask.device.type == "meta":  # no values to read (FLOP counting): the bench builds short negatives itself
        return embeds, mask
    keep = (mask != 0).any(dim=0)
    if bool(keep.all()) or not bool(keep.any()):
        return embeds, mask
    index = keep.nonzero().squeeze(1).to(embeds.device)
    return embeds.index_select(1, index), mask.index_select(1, index.to(mask.device))


def _current_negative(state: NAGState, pipeline: str | None) -> Negative | None:
    if pipeline is None:
        return state.fixed
    if state.negative is None:
        raise RuntimeError(f"NAG was applied to a {pipeline}, which encodes the negative once per pipeline call, but "
                           "this denoiser call came without one (a direct call, or another pipeline sharing this "
                           "denoiser, e.g. built with from_pipe): call it through that pipeline, or remove that guide "
                           "and apply NAG to the denoiser (or the other pipeline) itself")
    return state.negative


def guided_rows(batch: int, negative: Negative, text: torch.Tensor | None, pipeline: str | None, named: bool
                ) -> tuple[slice, bool] | None:
    """Which rows of a denoiser call of ``batch`` rows NAG guides, for a negative of ``r`` rows.

    Args:
        batch: the call's batch size.
        negative: the current negative.
        text: the call's prompt text (compared with the encoded prompt to recognise a separate unconditional call, and
            to find the conditional half of a batched CFG call), or None when it cannot be compared.
        pipeline: class name of the guided pipeline, or None for a bare denoiser.
        named: the pipeline named this call through ``cache_context``.

    Returns:
        ``(rows, expand)``: the guided rows, and whether a one-row negative must be expanded to every row (a bare
        denoiser); or None for a separate unconditional call (never guided).

    Raises:
        ValueError: when the batch fits neither the negative's rows nor batched CFG.
    """
    r = negative.embeds.shape[0]
    if batch == r:
        if (pipeline is not None and not named and text is not None and negative.positive is not None
                and not _same(text, negative.positive)):
            return None  # a separate unconditional call (e.g. Kontext/Chroma true CFG), never guided
        return slice(0, batch), False
    if r == 1 and pipeline is None:
        return slice(0, batch), True
    if batch == 2 * r:
        if text is None:
            return slice(r, 2 * r), False
        return _conditional_half(text, negative.positive, r), False
    raise ValueError(f"the negative has {r} rows but the denoiser was called with batch {batch}; expected "
                     f"{r} (guide all rows) or {2 * r} (batched CFG: guide the conditional half)")


def plan_call(adapter: Adapter, state: NAGState, access: ArgAccess, args: tuple, kwargs: dict,
              module: torch.nn.Module, pipeline: str | None, named: bool = False
              ) -> tuple[tuple, dict, Packing] | None:
    """Guided-call inputs (packed text and what goes with it) and layout, or None for a plain call.

    The default packs ``[positive | negative]`` text (and mask) into the call; a family whose text cannot be packed
    that way (text-mixing refiners, positions tied to the text length, list inputs) sets ``Adapter.plan``, which then
    replaces everything after the window check (and may use :func:`guided_rows`).

    Args:
        adapter: the model family.
        state: the guide's state (settings, the negative).
        access: reads/writes the forward's arguments.
        args, kwargs: the call's arguments.
        module: the denoiser.
        pipeline: class name of the guided pipeline, or None for a bare denoiser.
        named: the pipeline named this call through ``cache_context`` (then "uncond" calls never get here);
            otherwise a pipeline call whose text is not the prompt's is its separate unconditional call.

    Returns:
        ``(args, kwargs, packing)`` for a guided call, else None.
    """
    config = state.config
    if config.is_off:
        return None
    text = access.get(adapter.text_arg, args, kwargs)
    if text is None or (adapter.plan is None and not isinstance(text, torch.Tensor)):
        return None
    negative = _current_negative(state, pipeline)
    if negative is None:
        return None
    if (config.start, config.end) != (0.0, 1.0):
        t = access.get(adapter.timestep_arg, args, kwargs)
        if t is not None and not _in_window(adapter, state, t):
            return None
    if adapter.plan is not None:
        return adapter.plan(module, access, args, kwargs, negative, state, pipeline, named)

    batch = text.shape[0]
    embeds, mask, extras = negative.embeds, negative.mask, negative.extras
    if mask is not None and adapter.drop_padding:
        if negative.unpadded is None:
            negative.unpadded = _drop_padding(embeds, mask)
        embeds, mask = negative.unpadded
    if embeds.shape[-1] != text.shape[-1]:
        raise ValueError(f"negative embeddings have {embeds.shape[-1]} channels, the prompt's have {text.shape[-1]}")
    found = guided_rows(batch, negative, text, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    if expand:
        embeds = embeds.expand(batch, -1, -1)
        mask = mask.expand(batch, -1) if mask is not None else None
        extras = {k: v.expand(batch, *v.shape[1:]) for k, v in extras.items()}
    embeds = embeds.to(device=text.device, dtype=text.dtype)
    ln = embeds.shape[1]
    if rows.stop - rows.start != batch:
        pad = [text.new_zeros(rows.start, ln, text.shape[-1]), embeds,
               text.new_zeros(batch - rows.stop, ln, text.shape[-1])]
        embeds = torch.cat(pad, dim=0)
    packing = Packing(lp=text.shape[1], ln=ln, rows=rows, batch=batch)
    args, kwargs = access.set(adapter.text_arg, torch.cat([text, embeds], dim=1), args, kwargs)
    args, kwargs = adapter.pack_mask(access, args, kwargs, mask, packing)
    if adapter.prepare is not None:
        args, kwargs = adapter.prepare(module, access, args, kwargs, extras, packing, state)
    return args, kwargs, packing


def pack_text_mask(mask_arg: str | None, access: ArgAccess, args: tuple, kwargs: dict,
                   mask: torch.Tensor | None, packing: Packing) -> tuple[tuple, dict]:
    """The default mask packing: a ``(B, L)`` text padding mask under ``mask_arg`` becomes ``[positive | negative]``
    (the negative's own mask on the guided rows, ones elsewhere). Families without a text mask pass
    ``mask_arg=None``: nothing to do."""
    if mask_arg is None:
        return args, kwargs
    pos_mask = access.get(mask_arg, args, kwargs)
    if pos_mask is None and mask is None:
        return args, kwargs
    batch, lp, ln = packing.batch, packing.lp, packing.ln
    like = pos_mask if pos_mask is not None else mask
    dtype = pos_mask.dtype if pos_mask is not None else torch.long
    if pos_mask is None:
        pos_mask = torch.ones(batch, lp, device=like.device, dtype=dtype)
    neg_mask = torch.ones(batch, ln, device=like.device, dtype=dtype)
    if mask is not None:
        neg_mask[packing.rows] = mask.to(device=like.device, dtype=dtype)
    return access.set(mask_arg, torch.cat([pos_mask, neg_mask], dim=1), args, kwargs)


# ---------------------------------------------------------------------------------------------------- processors
class ProcessorSwap:
    """Puts NAG processors over the guided modules' current processors for one forward, and back afterwards.

    The NAG processor for a given (module, original processor) pair is built once and reused, so ``torch.compile``
    sees the same objects on every guided call.
    """

    def __init__(self, adapter: Adapter, modules: dict[str, torch.nn.Module], state: NAGState) -> None:
        self.adapter = adapter
        self.modules = modules
        self.state = state
        self._wrappers: dict[str, tuple[Any, Any]] = {}

    def wrapper(self, name: str, module: torch.nn.Module) -> Any:
        """The NAG processor over ``module``'s current processor; raise when NAG cannot split that processor."""
        inner = module.processor
        cached = self._wrappers.get(name)
        if cached is not None and cached[0] is inner:
            return cached[1]
        nag_class = self.adapter.processor_for(inner)
        if nag_class is None:
            supported = ", ".join(sorted(c.__name__ for c in self.adapter.processors))
            raise NotImplementedError(
                f"{type(module).__name__} '{name}' of {self.adapter.model_class.__name__} now uses "
                f"{type(inner).__name__}, which NAG cannot guide (it would attend to the prompt and the NAG negative "
                f"together); supported processors: {supported}. Restore a supported processor or remove NAG")
        wrapper = nag_class(inner, self.state)
        self._wrappers[name] = (inner, wrapper)
        return wrapper

    def check(self) -> None:
        """Raise now if any guided module carries a processor NAG cannot guide."""
        for name, module in self.modules.items():
            self.wrapper(name, module)

    def install(self) -> list[tuple[torch.nn.Module, Any]]:
        """Put the NAG processors in; returns what :meth:`restore` needs."""
        wrappers = [(module, self.wrapper(name, module)) for name, module in self.modules.items()]
        undo = []
        for module, wrapper in wrappers:
            original = module.processor
            if isinstance(original, torch.nn.Module):  # IP-Adapter processors live in _modules
                del module._modules["processor"]
            module.processor = wrapper  # plain setattr: what torch.compile guards (never shadow _modules)
            undo.append((module, original))
        return undo

    @staticmethod
    def restore(undo: list[tuple[torch.nn.Module, Any]]) -> None:
        """Put the original processors back."""
        for module, original in reversed(undo):
            if isinstance(original, torch.nn.Module):
                del module.__dict__["processor"]
            module.processor = original


# ---------------------------------------------------------------------------------------------------- hooks
class NAGDenoiserHook(ModelHook):
    """Packs ``[positive | negative]`` text and swaps NAG processors in on guided calls; a pure pass-through
    otherwise."""

    _is_stateful = True

    def __init__(self, state: NAGState, adapter: Adapter, modules: dict[str, torch.nn.Module],
                 pipeline: str | None) -> None:
        super().__init__()
        self.state = state
        self.adapter = adapter
        self.pipeline = pipeline
        self.swap = ProcessorSwap(adapter, modules, state)
        self.access: ArgAccess | None = None
        self.cache_context = StateManager(_NoState)  # receives the pipeline's CacheContext
        self.layouts = LayoutTracker()  # text layout of the last call per context: foreign caches follow it

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.access = ArgAccess(type(module).forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = self.cache_context._context
        name = context.name if context is not None else None
        state = self.state
        state.call_started = True
        plan = None
        if name not in UNCOND_CONTEXTS:
            plan = plan_call(self.adapter, state, self.access, args, kwargs, module, self.pipeline,
                             named=name is not None)
        track_layout(module, self.layouts, name, None if plan is None else plan[2])  # caches: text length changed?
        if plan is None:
            state.calls["unguided"] += 1
            return self.fn_ref.original_forward(*args, **kwargs)
        args, kwargs, packing = plan
        undo = self.swap.install()
        state.calls["guided"] += 1
        state.packing = state.last_packing = packing
        try:
            with guidance_method(state.config.method, state.config.offset):  # NAG or an experimental method
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.packing = None
            state.extras.clear()
            self.swap.restore(undo)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by the pipeline at the end of every call (``maybe_free_model_hooks``), as every cache's reset.
        self.layouts.reset()
        if self.pipeline is not None:
            self.state.end_call()
        return module


class NAGBlockHook(ModelHook):
    """Runs a family's guided version of a block's forward while a guided call is in flight."""

    def __init__(self, state: NAGState, forward: Any) -> None:
        super().__init__()
        self.state = state
        self.forward = forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state.packing is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.forward(module, self.state, self.fn_ref.original_forward, *args, **kwargs)


def _accelerate_hook(module: torch.nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def install_hook(module: torch.nn.Module, hook: ModelHook) -> dict[str, Any]:
    """Register ``hook`` on ``module``; returns what :func:`uninstall_hook` needs to restore the module exactly.

    An accelerate offload hook (``enable_model_cpu_offload``) is taken off and put back on top, so NAG sits *inside*
    it: accelerate's own remove/re-add at the end of each pipeline call then keeps NAG in place.
    """
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    offload = _accelerate_hook(module)
    if offload is not None:
        remove_hook_from_module(module)
    record = {
        "offload": offload,
        "had_forward": "forward" in module.__dict__,
        "forward": module.__dict__.get("forward"),
        "created_registry": not hasattr(module, "_diffusers_hook"),
    }
    register_innermost(module, hook, HOOK_NAME)  # inside caches and offloading, whichever came first
    if offload is not None:
        add_hook_to_module(module, offload)
    return record


def uninstall_hook(module: torch.nn.Module, record: dict[str, Any]) -> None:
    """Undo :func:`install_hook`: no hook, registry or ``forward`` attribute of ours is left."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    offload = _accelerate_hook(module)
    if offload is not None:
        remove_hook_from_module(module)
    # keeps the other hooks running; when ours was the last one, ``forward`` and the registry go back as recorded
    remove_hook_safely(module, HOOK_NAME, record)
    if offload is not None:
        add_hook_to_module(module, offload)
