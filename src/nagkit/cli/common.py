"""What every ``nagkit`` command shares: the one-line error type, the embedded model's name, quiet libraries."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

#: the model name of the embedded toy pipeline (the default model of ``nagkit generate``)
EMBEDDED = "embedded"
#: the embedded model's many-step teacher (``embedded`` is its few-step student, :mod:`nagkit.toy.distill`)
EMBEDDED_TEACHER = "embedded-teacher"
EMBEDDED_MODELS = (EMBEDDED, EMBEDDED_TEACHER)
DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as one line (``nagkit: error: …``), exit status 2."""


def say(line: str, quiet: bool = False) -> None:
    """A progress/status line on stderr (nothing with ``--quiet``)."""
    if not quiet:
        print(line, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Before torch/diffusers/transformers are imported: silence their advisory warnings (transformers'
    torchvision fallbacks, tokenizer length notices, deprecations), keeping real warnings and errors."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


_TRUNCATED = re.compile(r"truncated because (?P<why>.+?) (?:up to|is set to)\s+(?P<limit>\d+) tokens: \[?(?P<rest>.*)",
                        re.DOTALL)


class TruncationNotice(logging.Filter):
    """Turns diffusers' truncation warnings (which echo the whole dropped text) into one short line per text and
    tokenizer limit: ``nagkit: the prompt is longer than CLIP's 77 tokens: 12 tokens dropped``.

    Args:
        texts: ``{label: text}`` of what the call encodes (prompt, negatives), to say which one was cut.
        count: ``count(dropped_text, which) -> tokens`` (None: words).
        emit: where the line goes (default: stderr).
    """

    def __init__(self, texts: dict[str, str], count: Callable[[str, str], int] | None = None,
                 emit: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.texts = {k: v for k, v in texts.items() if v}
        self.count = count
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        match = _TRUNCATED.search(record.getMessage())
        if match is None:
            return True
        dropped = match.group("rest").strip().rstrip("]").strip().strip("'\"")
        which = next((label for label, text in self.texts.items()
                      if dropped and " ".join(dropped.split())[:40].lower() in " ".join(text.split()).lower()),
                     "a text")
        encoder = "CLIP" if "CLIP" in match.group("why") else "the text encoder"
        key = (which, f"{encoder}{match.group('limit')}")
        if key not in self.seen:
            self.seen.add(key)
            n = self.count(dropped, match.group("why")) if self.count else len(dropped.split())
            unit = "tokens" if self.count else "words"
            self.emit(f"nagkit: {which} is longer than {encoder}'s {match.group('limit')} tokens: {n} {unit} dropped")
        return False
