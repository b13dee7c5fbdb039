"""What a model family tells nagkit: which denoiser class, which attention modules, which processors, which inputs.

Adding a cross-attention family is one :class:`Adapter` and, when its attention processor is new, one NAG processor
class (the original processor's code with its single attention call replaced by
:func:`nagkit.kernels.nag_cross_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.config import NAGConfig
from ..core.state import NAGState


class NAGProcessor:
    """Base of every NAG attention processor.

    It wraps the module's original processor (``inner``), which it calls unchanged whenever the current denoiser call
    is not guided, and which :meth:`nagkit.Guide.remove` puts back. Subclasses re-declare the exact ``__call__``
    parameters of the processor they replace, because diffusers drops keyword arguments a processor does not name.
    """

    def __init__(self, inner: object | None = None, state: NAGState | None = None) -> None:
        # No required arguments: diffusers re-creates processors by calling their class with none (IP-Adapter
        # loading). Without a state the processor is a pass-through to ``inner``.
        self.inner = inner
        self.state = state

    @property
    def packing(self):  # noqa: ANN201
        """The layout of the guided call in flight, or None (then the processor passes through to ``inner``)."""
        return None if self.state is None else self.state.packing

    # diffusers' ``set_attention_backend`` writes these on processors; keep them on the original one.
    @property
    def _attention_backend(self):  # noqa: ANN202
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:  # noqa: ANN001
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):  # noqa: ANN202
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:  # noqa: ANN001
        self.inner._parallel_config = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={type(self.inner).__name__})"


@dataclass(frozen=True)
class Adapter:
    """How NAG installs on one denoiser class.

    Attributes:
        family: short family name (also the default preset name).
        model_class: the diffusers denoiser class.
        processors: original processor class -> NAG processor class that replaces it.
        select: ``select(module_name, module) -> bool``: the attention modules that get NAG.
        text_arg: forward argument holding the text embeddings (packed as ``[positive | negative]``).
        mask_arg: forward argument holding a ``(B, L)`` text padding mask, or None when the family has none.
        pack_mask: ``pack_mask(access, args, kwargs, negative_mask, packing) -> (args, kwargs)``: packs the mask
            argument for a guided call; default: ``mask_arg`` is a ``(B, L)`` text mask that becomes
            ``[positive | negative]`` (families whose mask covers more than the text override it, e.g. Chroma).
        timestep_arg: forward argument holding the timestep (for the ``start``/``end`` window).
        timestep_max: the training horizon ``T`` in ``u = 1 − t/T``.
        window: ``window(config, t) -> bool``: whether a call at timestep ``t`` is guided; default
            ``config.in_window(t, timestep_max)`` (UNet overrides it with the official integer rule).
        preset: default preset name.
        notes: one line for ``nagkit info``.
        negative_keys: further forward arguments a negative may carry (e.g. Flux's ``pooled_projections``).
        prepare: ``prepare(model, access, args, kwargs, negative, packing, state) -> (args, kwargs)``, run after
            the text is packed on a guided call: extra packing (e.g. text position ids) and per-call state.
        official_norm: the norm the official implementation uses for this family (``mode="official"``).
        block_forwards: block class -> ``forward(block, state, original_forward, *args, **kwargs)`` used for that
            block on guided calls (per-segment modulation of the text stream), installed as a block hook.
    """

    family: str
    model_class: type
    processors: dict[type, type[NAGProcessor]]
    select: Callable[[str, torch.nn.Module], bool]
    text_arg: str = "encoder_hidden_states"
    mask_arg: str | None = None
    timestep_arg: str = "timestep"
    timestep_max: float = 1000.0
    preset: str = ""
    notes: str = ""
    negative_keys: tuple[str, ...] = ()
    official_norm: str = "l1"
    prepare: Callable | None = None
    block_forwards: dict[type, Callable] = field(default_factory=dict)
    mask_packer: Callable | None = None
    window: Callable | None = None

    def processor_for(self, processor: object) -> type[NAGProcessor] | None:
        """The NAG processor class that can wrap ``processor`` (by exact class, then subclass), or None."""
        found = self.processors.get(type(processor))
        if found is not None:
            return found
        for klass, nag_class in self.processors.items():
            if isinstance(processor, klass):
                return nag_class
        return None

    def in_window(self, config: NAGConfig, timestep: float) -> bool:
        """Whether a denoiser call at ``timestep`` is inside the ``start``/``end`` window."""
        if self.window is not None:
            return self.window(config, timestep)
        return config.in_window(timestep, self.timestep_max)

    def pack_mask(self, access: Any, args: tuple, kwargs: dict, mask: torch.Tensor | None, packing: Any
                  ) -> tuple[tuple, dict]:
        """Pack the mask argument of a guided call (see ``mask_packer``)."""
        if self.mask_packer is not None:
            return self.mask_packer(access, args, kwargs, mask, packing)
        from ..integration.hook import pack_text_mask

        return pack_text_mask(self.mask_arg, access, args, kwargs, mask, packing)


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter (also for user-defined families). Later registrations win for the same class."""
    _REGISTRY.insert(0, adapter)
    return adapter


def supported_models() -> list[str]:
    """Names of the supported denoiser classes."""
    return sorted({a.model_class.__name__ for a in _REGISTRY})


def find_adapter(model: torch.nn.Module) -> Adapter | None:
    """The adapter for ``model``'s class (exact class first, then subclasses), or None."""
    for adapter in _REGISTRY:
        if type(model) is adapter.model_class:
            return adapter
    for adapter in _REGISTRY:
        if isinstance(model, adapter.model_class):
            return adapter
    return None


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; raise ``TypeError`` naming its class and the supported ones."""
    adapter = find_adapter(model)
    if adapter is None:
        raise TypeError(f"nagkit does not support {type(model).__name__}; supported denoisers: "
                        f"{', '.join(supported_models())}")
    return adapter


def nag_modules(model: torch.nn.Module, adapter: Adapter) -> dict[str, torch.nn.Module]:
    """The attention modules of ``model`` that get a NAG processor, checked against the processors NAG supports."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "processor") or not hasattr(module, "set_processor"):
            continue
        if not adapter.select(name, module):
            continue
        processor = module.processor
        if adapter.processor_for(processor) is None:
            supported = ", ".join(sorted(c.__name__ for c in adapter.processors))
            raise NotImplementedError(f"{adapter.model_class.__name__}.{name} uses {type(processor).__name__}, which "
                                      f"nagkit cannot guide; supported processors here: {supported}")
        found[name] = module
    if not found:
        raise NotImplementedError(f"{type(model).__name__} has no text cross-attention module nagkit can guide")
    return found
