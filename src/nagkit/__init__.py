"""nagkit: Normalized Attention Guidance (arXiv 2505.21179) for diffusers pipelines and denoisers.

>>> import nagkit
>>> guide = nagkit.apply(pipe, negative_prompt="blurry, low quality", scale=5.0, tau=2.5, alpha=0.25)
>>> image = pipe("a corgi wearing a flower crown", num_inference_steps=4, guidance_scale=0.0).images[0]
>>> guide.remove()

The public names are imported on first use (PEP 562), so ``import nagkit`` and the command line's ``--help`` do not
load torch or diffusers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("nagkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

#: public name -> module that defines it
_LAZY = {
    "register_adapter": ".adapters", "supported_models": ".adapters",
    "PRESETS": ".core", "NAGConfig": ".core", "get_preset": ".core", "nag": ".core",
    "PIPELINES": ".integration", "Guide": ".integration", "apply": ".integration",
}

if TYPE_CHECKING:
    from .adapters import register_adapter, supported_models
    from .core import PRESETS, NAGConfig, get_preset, nag
    from .integration import PIPELINES, Guide, apply


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nagkit' has no attribute {name!r}")
    importlib.import_module(".adapters", __name__)  # every family registers its adapter and presets on import
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["PIPELINES", "PRESETS", "Guide", "NAGConfig", "__version__", "apply", "get_preset", "nag",
           "register_adapter", "supported_models"]
