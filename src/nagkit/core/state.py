"""Runtime state shared by the denoiser hook (which packs inputs), the attention processors (which guide) and the
pipeline wrappers (which encode the negative once per call)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
class Negative:
    """A NAG negative in embedding form: for one pipeline call, or the fixed negative of a bare denoiser.

    Attributes:
        embeds: ``(R, Ln, C)`` negative text embeddings.
        mask: ``(R, Ln)`` padding mask of the negative (1 = keep), or None.
        positive: ``(R, Lp, C)``: the call's prompt embeddings, to tell the conditional rows from the others.
        extras: the negative's counterparts of further denoiser inputs, e.g. its pooled embedding ``(R, P)``.
        unpadded: ``(embeds, mask)`` without the tokens every row masks out, computed once by the first guided call
            (a host sync per negative, not per denoising step).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    positive: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    unpadded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # cache of the packing


@dataclass
class NAGState:
    """Mutable state of one installed guide.

    Attributes:
        config: current settings (replaced by ``update``).
        packing: set by the denoiser hook only for the duration of a guided forward; ``None`` means every
            NAG processor passes straight through to the original one.
        negative: the negative of the pipeline call in flight (pipelines), set when the call encodes its prompt.
        fixed: the negative given to ``apply``/``update`` in embedding form (bare denoisers, or pipeline embeddings).
        call_started: a denoiser ran since ``negative`` was encoded (a new encode then starts a new call).
        call_arguments: arguments of the pipeline call in flight that ``encode_prompt`` does not see (e.g. FLUX's
            CFG ``negative_prompt``), read from its ``check_inputs``.
        calls: counters of guided / unguided denoiser calls (for tests and diagnostics).
        last_packing: the layout of the most recent guided call (diagnostics).
        extras: per-call tensors a family prepares for its block hooks (e.g. the negative's modulation).
    """

    config: NAGConfig
    packing: Packing | None = None
    negative: Negative | None = None
    fixed: Negative | None = None
    call_started: bool = False
    call_arguments: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: {"guided": 0, "unguided": 0})
    last_packing: Packing | None = None
    extras: dict = field(default_factory=dict)

    def end_call(self) -> None:
        """Forget the pipeline call in flight (its negative and arguments)."""
        self.negative = None
        self.call_started = False
        self.call_arguments = {}
