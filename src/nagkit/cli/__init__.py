"""The ``nagkit`` command line (``generate``, ``info``)."""

from .main import main

__all__ = ["main"]
