"""nagkit: Normalized Attention Guidance (arXiv 2505.21179) for diffusers pipelines and denoisers.

>>> import nagkit
>>> guide = nagkit.apply(pipe, negative_prompt="blurry, low quality", scale=5.0, tau=2.5, alpha=0.25)
>>> image = pipe("a corgi wearing a flower crown", num_inference_steps=4, guidance_scale=0.0).images[0]
>>> guide.remove()
"""

from importlib.metadata import PackageNotFoundError, version

from .adapters import register_adapter, supported_models
from .core import PRESETS, NAGConfig, get_preset, nag
from .integration import PIPELINES, Guide, apply

try:
    __version__ = version("nagkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["PIPELINES", "PRESETS", "Guide", "NAGConfig", "__version__", "apply", "get_preset", "nag",
           "register_adapter", "supported_models"]
