"""Core math and settings: the NAG operator, its configuration and presets, the shared runtime state."""

from .config import METHOD_DEFAULTS, METHODS, PRESETS, NAGConfig, get_preset, register_preset
from .operator import nag, nag_combine, nasa_combine, validate_params
from .state import NAGState

__all__ = ["METHODS", "METHOD_DEFAULTS", "PRESETS", "NAGConfig", "NAGState", "get_preset", "nag", "nag_combine",
           "nasa_combine", "register_preset", "validate_params"]
