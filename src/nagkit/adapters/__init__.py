"""Model families: which denoisers and pipelines NAG supports, how it installs on each, and their presets, tiny test
pipelines and benchmark inputs (one module per family; see :mod:`nagkit.adapters.base`).

Importing this package imports every module in it, so each family module registers itself: the built-in ones in
:data:`BUILTIN_FAMILIES` order (the order of ``nagkit.tiny.pipelines.TINY_PIPELINES``), then any other module of the
package by name. A new family is one new module here; nothing else lists it.
"""

import pkgutil
from importlib import import_module

from .base import (
    Adapter,
    NAGProcessor,
    PipelineSpec,
    TinyModel,
    adapter_for,
    find_adapter,
    find_adapter_class,
    nag_modules,
    register_adapter,
    supported_models,
)

#: The built-in family modules, in registration order.
BUILTIN_FAMILIES = ("unet", "wan", "pixart", "sana", "sd3", "flux", "chroma")


def _family_modules() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))
    return [*(n for n in BUILTIN_FAMILIES if n in found), *(n for n in found if n not in BUILTIN_FAMILIES)]


for _name in _family_modules():
    import_module(f"{__name__}.{_name}")

__all__ = ["BUILTIN_FAMILIES", "Adapter", "NAGProcessor", "PipelineSpec", "TinyModel", "adapter_for", "find_adapter",
           "find_adapter_class", "nag_modules", "register_adapter", "supported_models"]
