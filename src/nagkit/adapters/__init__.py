"""Model-family adapters: which denoisers NAG supports and how it installs on each.

Importing this package registers the built-in families.
"""

from . import flux, pixart, sana, sd3, unet, wan  # noqa: F401  (registration)
from .base import Adapter, NAGProcessor, adapter_for, find_adapter, nag_modules, register_adapter, supported_models

__all__ = ["Adapter", "NAGProcessor", "adapter_for", "find_adapter", "nag_modules", "register_adapter",
           "supported_models"]
