"""Shared pytest configuration: the ``bench`` marker for slow full-size benchmark tests.

Tests marked ``@pytest.mark.bench`` are skipped by default; run them with ``NAGKIT_BENCH=1 pytest`` or
``pytest -m bench``.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: slow full-size benchmark tests (NAGKIT_BENCH=1 or -m bench to run)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("NAGKIT_BENCH") == "1" or "bench" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="benchmark test: set NAGKIT_BENCH=1 or run pytest -m bench")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)
