"""Runtime state shared by the denoiser hook (which packs inputs) and the attention processors (which guide)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels.cross import Packing
from .config import NAGConfig


@dataclass
class NAGState:
    """Mutable state of one installed guide.

    Attributes:
        config: current settings (replaced by ``update``).
        packing: set by the denoiser hook only for the duration of a guided forward; ``None`` means every
            NAG processor passes straight through to the original one.
        calls: counters of guided / unguided denoiser calls (for tests and diagnostics).
        last_packing: the layout of the most recent guided call (diagnostics).
    """

    config: NAGConfig
    packing: Packing | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"guided": 0, "unguided": 0})
    last_packing: Packing | None = None
