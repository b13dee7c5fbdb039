"""Living together with diffusers' caches (FasterCache, Pyramid Attention Broadcast, FirstBlockCache, TaylorSeer,
MagCache, SeaCache, the text K/V cache) and other ``HookRegistry`` hooks.

Three things are needed:

* **Hook order.** nagkit's hooks go *innermost* in a module's ``HookRegistry`` (:func:`register_innermost`): every
  other hook wraps them, whatever the order of ``nagkit.apply`` and ``enable_cache``. On FLUX blocks, nagkit's block
  hook replaces the block's forward on guided calls, so a cache block hook inside it would never run; on the
  denoiser, group offloading's hook must load the weights before nagkit's hook uses them (FLUX's negative ``temb``).
* **Removal.** diffusers' ``HookRegistry.remove_hook`` drops the ``new_forward`` of the hook right outside the one
  removed (it rewires ``forward`` instead of ``original_forward``): removing nagkit would silently switch a cache
  off, and ``disable_cache()`` would silently switch nagkit's block hooks off. :func:`remove_hook_safely` unlinks a
  hook wherever it sits and keeps every other hook running.
* **Invalidation.** A guided call carries ``[positive | negative]`` text, a plain one only the positive text, so the
  text length changes between consecutive denoiser calls when a ``start``/``end`` window opens or closes, and between
  the conditional (guided) and unconditional (plain) calls of true-CFG pipelines. Caches that keep block or
  attention outputs which include the text then reuse tensors of the wrong length (a crash on FLUX) or of the other
  layout. nagkit's denoiser hook records each call's layout (:func:`track_layout`, :class:`LayoutTracker`) and, when
  it changed, :func:`invalidate_caches` makes every foreign cache under the denoiser recompute what it would reuse.

Everything here works on diffusers' ``HookRegistry`` internals (``_hook_order``, ``_fn_refs``, ``HookFunctionReference``
``forward`` / ``original_forward``), as of diffusers 0.41-0.42.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference, StateManager

logger = logging.getLogger(__name__)

#: Name of nagkit's own hooks (the denoiser hook and the FLUX block hooks); :func:`invalidate_caches` skips them.
NAGKIT_HOOK_NAME = "nagkit"

__all__ = [
    "NAGKIT_HOOK_NAME",
    "LayoutChange",
    "LayoutTracker",
    "has_foreign_state",
    "invalidate_caches",
    "register_innermost",
    "remove_hook_safely",
    "track_layout",
]


# ---------------------------------------------------------------------------------------------------- the chain
# How diffusers chains hooks: hook ``i`` has a ``HookFunctionReference`` whose ``forward`` is what it calls (a hook
# without ``new_forward``) or its own ``new_forward`` (then ``original_forward`` is what that calls). "What hook ``i``
# calls" is the link of hook ``i - 1`` (a partial of diffusers' rewritten forward), or the module's own forward for the
# innermost hook; ``module.forward`` is the link of the outermost hook.
def _inner(fn_ref: HookFunctionReference) -> Any:
    """The callable a hook calls to run everything inside it."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_inner(fn_ref: HookFunctionReference, forward: Any) -> None:
    """Make a hook call ``forward`` to run everything inside it (keeping its ``new_forward`` if it has one)."""
    if fn_ref.original_forward is not None:
        fn_ref.original_forward = forward
    else:
        fn_ref.forward = forward


def _link_of(registry: HookRegistry, index: int) -> Any:
    """The callable that runs hook ``index`` and everything inside it."""
    if index == len(registry._fn_refs) - 1:
        return registry._module_ref.forward
    return _inner(registry._fn_refs[index + 1])


def _rewrap(link: Any, old: Any, new: Any) -> None:
    """A link's ``__wrapped__`` (set by diffusers for ``inspect.signature``) that is ``old`` becomes ``new``: the
    signature still resolves to the module's forward, and a removed hook is not kept alive through it."""
    if getattr(link, "__wrapped__", None) is old:
        try:
            link.__wrapped__ = new
        except (AttributeError, TypeError):  # pragma: no cover - a foreign callable without a __dict__
            pass


def register_innermost(module: torch.nn.Module, hook: ModelHook, name: str) -> HookRegistry:
    """Register ``hook`` as the innermost hook of ``module``'s ``HookRegistry`` (created when missing).

    The hooks already registered keep running, all of them outside the new one: on a call, they run first (outermost
    first), then ``hook``, then the module's own forward. diffusers' ``register_hook`` builds the link of the new hook
    (so it is exactly what diffusers would build), which is then moved to the inside of the chain.

    Args:
        module: the module to hook.
        hook: the hook (``initialize_hook`` is called on ``module``, as by ``register_hook``).
        name: its name in the registry; must not be taken.

    Returns:
        The module's registry.

    Raises:
        ValueError: when ``name`` is already registered on ``module``.
    """
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if name in registry.hooks:
        raise ValueError(f"a hook named {name!r} is already registered on this {type(module).__name__}")
    if not registry._hook_order:
        registry.register_hook(hook, name)
        return registry

    module_ref = registry._module_ref
    innermost = registry._fn_refs[0]
    base = _inner(innermost)  # the module's own forward, as the innermost hook captured it
    old_innermost_link = _link_of(registry, 0)
    had_forward, outer = "forward" in module_ref.__dict__, module_ref.__dict__.get("forward")
    module_ref.forward = base
    try:
        registry.register_hook(hook, name)  # appended as the outermost hook, wrapping ``base``
        new_link = module_ref.__dict__["forward"]
    finally:
        if had_forward:
            module_ref.forward = outer
        else:  # pragma: no cover - diffusers always leaves its outermost link as an instance attribute
            module_ref.__dict__.pop("forward", None)
    registry._hook_order.insert(0, registry._hook_order.pop())
    registry._fn_refs.insert(0, registry._fn_refs.pop())
    _set_inner(innermost, new_link)
    _rewrap(old_innermost_link, base, new_link)
    return registry


def remove_hook_safely(module: torch.nn.Module, name: str, record: Mapping[str, Any] | None = None) -> bool:
    """Remove the hook ``name`` from ``module``'s registry, wherever it sits in the chain, keeping every other hook
    running (diffusers' ``remove_hook`` drops the ``new_forward`` of the hook outside a removed inner one).

    When the registry ends up empty, ``module.forward`` becomes the module's own forward again: the forward the
    innermost hook wrapped, as an instance attribute only if it is not just the class's ``forward``. ``record`` (what
    :func:`nagkit.integration.hook.install_hook` saw before registering) makes that exact: ``had_forward`` /
    ``forward`` (an instance ``forward`` that existed before, or none) are restored when the registry was empty at
    install time (a recorded ``forward`` that was another hook's link is not put back), and the registry attribute is
    deleted when ``created_registry``.

    Args:
        module: the hooked module.
        name: the hook to remove; nothing happens when it is not registered.
        record: ``{"had_forward": bool, "forward": callable | None, "created_registry": bool}``, or None.

    Returns:
        True when a hook was removed.
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return False
    module_ref = registry._module_ref
    index = registry._hook_order.index(name)
    hook = registry.hooks[name]
    inner = _inner(registry._fn_refs[index])
    if index == len(registry._hook_order) - 1:
        module_ref.forward = inner
    else:
        above = registry._fn_refs[index + 1]
        removed_link = _inner(above)  # what ``above`` called: the removed hook's link
        _set_inner(above, inner)
        _rewrap(_link_of(registry, index + 1), removed_link, inner)
    registry._module_ref = hook.deinitalize_hook(module_ref)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)
    if not registry.hooks:
        _restore_forward(module, inner, record)
        if record is not None and record.get("created_registry", False):
            del module._diffusers_hook
    return True


def _is_class_forward(module: torch.nn.Module, forward: Any) -> bool:
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def _restore_forward(module: torch.nn.Module, own: Any, record: Mapping[str, Any] | None) -> None:
    """Leave ``module`` with its own forward ``own`` (what the innermost hook wrapped), exactly as recorded when the
    record describes it."""
    if record is not None:
        if record.get("had_forward", False) and record.get("forward") is own:
            module.forward = own
            return
        if not record.get("had_forward", False) and _is_class_forward(module, own):
            module.__dict__.pop("forward", None)
            return
    if _is_class_forward(module, own):
        module.__dict__.pop("forward", None)
    else:
        module.forward = own


# ---------------------------------------------------------------------------------------------------- layouts
class LayoutChange(NamedTuple):
    """How the text layout of a denoiser call compares with earlier calls (falsy when nothing changed).

    Attributes:
        in_context: it differs from the previous call in the same cache context (e.g. "cond"): per-context cache
            states (``StateManager``) of that context are stale.
        since_last_call: it differs from the previous call, whatever its context: cache states shared by all
            contexts (Pyramid Attention Broadcast, FasterCache's attention hooks) are stale.
    """

    in_context: bool
    since_last_call: bool

    def __bool__(self) -> bool:
        return self.in_context or self.since_last_call


_NO_CHANGE = LayoutChange(False, False)
_UNSET = object()


class LayoutTracker:
    """The text layout of the last denoiser call, per cache context and overall.

    The layout is any value compared with ``==`` (nagkit: ``None`` for a plain call, the call's ``Packing`` for a
    guided one). The first call (per context, or overall) is no change: nothing was cached yet. Reset it whenever the
    caches are reset (the end of a pipeline call: ``reset_state``).
    """

    def __init__(self) -> None:
        self._contexts: dict[Hashable, Any] = {}
        self._last: Any = _UNSET

    def update(self, context: Hashable, layout: Any) -> LayoutChange:
        """Record the layout of the call in flight.

        Args:
            context: the cache context's name (``None`` outside any ``cache_context``).
            layout: the call's layout.

        Returns:
            What changed (falsy when nothing did).
        """
        previous = self._contexts.get(context, _UNSET)
        last = self._last
        self._contexts[context] = layout
        self._last = layout
        in_context = previous is not _UNSET and previous != layout
        since_last = last is not _UNSET and last != layout
        if not (in_context or since_last):
            return _NO_CHANGE
        return LayoutChange(in_context, since_last)

    def reset(self) -> None:
        """Forget every recorded layout."""
        self._contexts.clear()
        self._last = _UNSET


# ---------------------------------------------------------------------------------------------------- invalidation
def _classes(module_name: str, *names: str) -> tuple[type, ...]:
    """The classes of a diffusers hooks module that exist in the installed version."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # pragma: no cover - an older diffusers without this cache
        return ()
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


def _known() -> dict[str, tuple[type, ...]]:
    return {
        # image-only residuals, indexed by a step counter that must keep running: left alone
        "keep": (*_classes("diffusers.hooks.mag_cache", "MagCacheHeadHook", "MagCacheBlockHook"),
                 # the prompt pointer of the call in flight, written before nagkit's hook runs
                 *_classes("diffusers.hooks.text_kv_cache", "TextKVCacheTransformerHook")),
        "faster_block": _classes("diffusers.hooks.faster_cache", "FasterCacheBlockHook"),
        "faster_denoiser": _classes("diffusers.hooks.faster_cache", "FasterCacheDenoiserHook"),
        "text_kv_block": _classes("diffusers.hooks.text_kv_cache", "TextKVCacheBlockHook"),
        "pab": _classes("diffusers.hooks.pyramid_attention_broadcast", "PyramidAttentionBroadcastHook"),
    }


_KNOWN: dict[str, tuple[type, ...]] | None = None


def _state_managers(hook: ModelHook) -> list[StateManager]:
    return [value for value in vars(hook).values() if isinstance(value, StateManager)]


def _drop_context_state(manager: StateManager, context_name: str | None) -> bool:
    """Drop one context's state of a ``StateManager`` (it is created afresh on the next ``get_state``).

    Never ``StateManager.reset()``: that also clears the context the pipeline set for the call in flight, and the
    next ``get_state`` raises "No cache context is set".
    """
    context = manager._context
    name = context.name if context is not None else context_name
    if name is None:
        return False
    return manager._state_cache.pop(name, None) is not None


def _force_faster_block_recompute(hook: ModelHook) -> None:
    """FasterCache attention hook: compute (not approximate) at its next call. ``reset_state`` is not enough: with
    ``iteration == 0`` a guidance-distilled model skips, and the skip then reads the emptied cache."""
    state = hook.state
    state.cache = None
    state.iteration = max(int(hook.block_skip_range), 1)


def _force_faster_denoiser_refresh(hook: ModelHook) -> None:
    """FasterCache denoiser hook (batched CFG), in the middle of its call: if this call approximates the
    unconditional half from an earlier delta, make the next call compute both halves (its own ``iteration += 1``
    follows this call)."""
    state, period = hook.state, int(hook.unconditional_batch_skip_range)
    if period > 1 and state.iteration > 0 and state.iteration % period != 0:
        state.iteration = period - 1


def _registries(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module, HookRegistry]]:
    """Every hook registry on ``denoiser`` and its submodules (walked, not the registry's cached child list, which
    goes stale when hooks are added without ``enable_cache``)."""
    found = []
    for name, module in denoiser.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if isinstance(registry, HookRegistry) and registry.hooks:
            found.append((name, module, registry))
    return found


@torch.compiler.disable
def invalidate_caches(denoiser: torch.nn.Module, context_name: str | None, *, contextual: bool = True,
                      shared: bool = True, skip: tuple[str, ...] = (NAGKIT_HOOK_NAME,)) -> list[str]:
    """Make every diffusers cache on ``denoiser`` (and its submodules) recompute instead of reusing states cached
    under another text layout.

    Meant to be called from nagkit's denoiser hook (the innermost hook on the denoiser), i.e. in the middle of the
    denoiser's forward, after the hooks outside it started this call and before any block runs:

    * per-context states (``StateManager``: FirstBlockCache, TaylorSeer, SeaCache, text K/V blocks, and any unknown
      hook holding one), when ``contextual``: the state of the current context is dropped (created afresh when
      next needed); the other contexts' states stay;
    * states shared by all contexts, when ``shared``: Pyramid Attention Broadcast is reset, FasterCache's attention
      hooks compute at their next call, FasterCache's denoiser hook refreshes its delta at its next call, and an
      unknown stateful hook without a ``StateManager`` gets ``reset_state``;
    * MagCache (image residuals only; its step counter must keep running) and the text K/V cache's transformer hook
      (the current call's prompt key) are left alone; hooks named in ``skip`` (nagkit's own) too.

    Args:
        denoiser: the denoiser whose caches to invalidate.
        context_name: the cache context of the call in flight (``None`` outside ``cache_context``); used for
            ``StateManager`` s that have no context set.
        contextual: invalidate per-context states of the current context.
        shared: invalidate states shared by all contexts.
        skip: hook names to leave alone.

    Returns:
        ``"<module path>:<hook name>"`` of every hook whose state was invalidated (for diagnostics and tests).
    """
    global _KNOWN
    if _KNOWN is None:
        _KNOWN = _known()
    known = _KNOWN
    touched: list[str] = []
    seen: set[int] = set()
    for path, module, registry in _registries(denoiser):
        for hook_name in list(registry._hook_order):
            if hook_name in skip:
                continue
            hook = registry.hooks[hook_name]
            label = f"{path}:{hook_name}"
            if isinstance(hook, known["keep"]):
                continue
            if isinstance(hook, known["faster_block"]):
                if shared:
                    _force_faster_block_recompute(hook)
                    touched.append(label)
                continue
            if isinstance(hook, known["faster_denoiser"]):
                if shared:
                    _force_faster_denoiser_refresh(hook)
                    touched.append(label)
                continue
            if isinstance(hook, known["pab"]):
                if shared:
                    hook.reset_state(module)
                    touched.append(label)
                continue
            managers = ([hook.block_state_manager] if isinstance(hook, known["text_kv_block"])
                        else _state_managers(hook))
            if managers:
                if contextual:
                    dropped = False
                    for manager in managers:
                        if id(manager) not in seen:
                            seen.add(id(manager))
                            dropped |= _drop_context_state(manager, context_name)
                    if dropped:
                        touched.append(label)
                continue
            if hook._is_stateful and shared:
                try:
                    hook.reset_state(module)
                except NotImplementedError:
                    logger.warning("nagkit: cannot reset the state of hook %r (%s) after a text-layout change",
                                   hook_name, type(hook).__name__)
                    continue
                touched.append(label)
    return touched


def has_foreign_state(denoiser: torch.nn.Module, skip: tuple[str, ...] = (NAGKIT_HOOK_NAME,)) -> bool:
    """Whether a stateful hook other than those named in ``skip`` sits on ``denoiser`` or its submodules.

    Plain Python that ``torch.compile`` traces without a graph break (it reads the registry's list of child
    registries, which diffusers keeps and refreshes on ``enable_cache`` / ``disable_cache``).

    Args:
        denoiser: the denoiser.
        skip: hook names to ignore.

    Returns:
        True when some foreign hook is stateful (a cache).
    """
    root = getattr(denoiser, "_diffusers_hook", None)
    if root is None:
        return False
    children = getattr(root, "_get_child_registries", None)
    if children is not None:
        registries = [root, *children()]
    else:  # pragma: no cover - diffusers without the cached child list
        registries = [r for m in denoiser.modules() if (r := getattr(m, "_diffusers_hook", None)) is not None]
    for registry in registries:
        for name in registry._hook_order:
            if name not in skip and registry.hooks[name]._is_stateful:
                return True
    return False


def track_layout(denoiser: torch.nn.Module, tracker: LayoutTracker, context_name: str | None,
                 layout: Any) -> LayoutChange:
    """Record the text layout of the denoiser call in flight and, when it changed, invalidate the foreign caches
    (:func:`invalidate_caches`). For nagkit's denoiser hook, before it runs the rest of the forward.

    Under ``torch.compile`` without any foreign cache (the usual compiled setup) nothing is invalidated, so the traced
    forward has no graph break (``fullgraph=True`` keeps working when the layout alternates, e.g. true CFG).

    Args:
        denoiser: the denoiser.
        tracker: the hook's per-context record.
        context_name: the cache context of the call (``None`` outside ``cache_context``).
        layout: the call's layout (nagkit: the ``Packing`` of a guided call, ``None`` for a plain one).

    Returns:
        What changed (falsy when nothing did).
    """
    change = tracker.update(context_name, layout)
    if change and (not torch.compiler.is_compiling() or has_foreign_state(denoiser)):
        invalidate_caches(denoiser, context_name, contextual=change.in_context, shared=change.since_last_call)
    return change
