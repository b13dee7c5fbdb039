"""The ``nagkit`` command line (``demo``, ``generate``, ``info``, ``bench``); see :mod:`nagkit.cli.main`."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nagkit`` command (:func:`nagkit.cli.main.main`)."""
    from .main import main as run

    return run(argv)


__all__ = ["main"]
