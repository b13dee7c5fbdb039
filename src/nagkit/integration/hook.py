"""The denoiser hook: decides per call whether NAG is on, packs the negative text after the positive one, and marks
the layout for the NAG attention processors for the duration of the call.

It is a diffusers ``ModelHook`` (stateful, so pipelines' ``cache_context("cond"/"uncond")`` reaches it), installed
with diffusers' ``HookRegistry`` and removed without a trace (see :func:`install_hook` / :func:`uninstall_hook`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

if TYPE_CHECKING:
    from ..adapters.base import Adapter
    from .guide import Guide

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


class NAGDenoiserHook(ModelHook):
    """Packs ``[positive | negative]`` text on guided calls; a pure pass-through otherwise."""

    _is_stateful = True

    def __init__(self, guide: Guide, adapter: Adapter, module: torch.nn.Module) -> None:
        super().__init__()
        self.guide = guide
        self.adapter = adapter
        self.access = ArgAccess(type(module).forward)
        self.cache_context = StateManager(_NoState)  # receives the pipeline's CacheContext

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = self.cache_context._context
        name = context.name if context is not None else None
        self.guide._call_started = True
        plan = None if name in UNCOND_CONTEXTS else self.guide._plan(self.adapter, self.access, args, kwargs, module,
                                                                     named=name is not None)
        state = self.guide.state
        if plan is None:
            state.calls["unguided"] += 1
            return self.fn_ref.original_forward(*args, **kwargs)
        args, kwargs, packing = plan
        state.calls["guided"] += 1
        state.packing = state.last_packing = packing
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.packing = None
            state.extras.clear()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by the pipeline at the end of every call (``maybe_free_model_hooks``).
        self.guide._end_call()
        return module


class NAGBlockHook(ModelHook):
    """Runs an adapter's guided version of a block's forward while a guided call is in flight."""

    def __init__(self, state: Any, forward: Any) -> None:
        super().__init__()
        self.state = state
        self.forward = forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state.packing is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.forward(module, self.state, self.fn_ref.original_forward, *args, **kwargs)


def _accelerate_hook(module: torch.nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def install_hook(module: torch.nn.Module, hook: NAGDenoiserHook) -> dict[str, Any]:
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
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    if offload is not None:
        add_hook_to_module(module, offload)
    return record


def uninstall_hook(module: torch.nn.Module, record: dict[str, Any]) -> None:
    """Undo :func:`install_hook`: no hook, registry or ``forward`` attribute of ours is left."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    offload = _accelerate_hook(module)
    if offload is not None:
        remove_hook_from_module(module)
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:  # ours was the only hook: put ``forward`` back exactly as it was
            if record["had_forward"]:
                module.forward = record["forward"]
            else:
                module.__dict__.pop("forward", None)
            if record["created_registry"]:
                del module._diffusers_hook
    if offload is not None:
        add_hook_to_module(module, offload)
