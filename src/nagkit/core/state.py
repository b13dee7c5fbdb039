"""Runtime state shared by the denoiser hook (which packs inputs) and the attention processors (which guide)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import NAGConfig


@dataclass(frozen=True)
class Packing:
    """Where the negative text sits in a packed text sequence, and which batch rows are guided.

    Attributes:
        lp: number of positive text tokens (first in the sequence).
        ln: number of negative text tokens (right after the positive ones).
        rows: the guided rows of the batch, a contiguous slice.
        batch: total rows in the batch.
    """

    lp: int
    ln: int
    rows: slice
    batch: int

    @property
    def all_rows(self) -> bool:
        return self.rows.start == 0 and self.rows.stop == self.batch


@dataclass
class NAGState:
    """Mutable state of one installed guide.

    Attributes:
        config: current settings (replaced by ``update``).
        packing: set by the denoiser hook only for the duration of a guided forward; ``None`` means every
            NAG processor passes straight through to the original one.
        calls: counters of guided / unguided denoiser calls (for tests and diagnostics).
        last_packing: the layout of the most recent guided call (diagnostics).
        extras: per-call tensors an adapter prepares for its block hooks (e.g. the negative's modulation).
    """

    config: NAGConfig
    packing: Packing | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"guided": 0, "unguided": 0})
    last_packing: Packing | None = None
    extras: dict = field(default_factory=dict)
