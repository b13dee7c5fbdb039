"""``nagkit demo``: negative prompting on the embedded model, no download — one PNG grid and the judge's numbers.

Rows: no guidance, CFG with the negative (``true_cfg_scale``), NAG (the ``embedded`` preset); columns: 1, 2, 4 and 8
sampling steps. Every cell is generated for the same seeds; the grid shows the first four, the numbers use all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nagkit.toy.evaluate import Method, generate, image_grid, score

__all__ = ["DEMO_CFG_SCALE", "DEMO_NEGATIVE", "DEMO_PROMPT", "demo_methods", "run_demo"]

#: Default demo prompt and negative: the prompt leaves the colour open, the negative excludes one.
DEMO_PROMPT = "a circle"
DEMO_NEGATIVE = "red"
#: CFG scale of the demo's CFG row.
DEMO_CFG_SCALE = 4.0


def demo_methods(cfg_scale: float = DEMO_CFG_SCALE, nag_scale: float | None = None, nag_tau: float | None = None,
                 nag_alpha: float | None = None) -> list[Method]:
    """The demo's three rows.

    Args:
        cfg_scale: ``true_cfg_scale`` of the CFG row.
        nag_scale: NAG scale of the NAG row (default: the ``embedded`` preset's, 8).
        nag_tau: NAG ``tau`` (default: the ``embedded`` preset's, 5).
        nag_alpha: NAG ``alpha`` (default: the ``embedded`` preset's, 1).

    Returns:
        ``[none, cfg, nag]``.
    """
    from nagkit.core.config import get_preset

    preset = get_preset("embedded").with_updates(scale=nag_scale, tau=nag_tau, alpha=nag_alpha)
    return [Method("none"), Method("cfg", cfg_scale), Method("nag", preset.scale, preset.tau, preset.alpha)]


def run_demo(
    out: str | Path = "nagkit_demo.png",
    prompt: str = DEMO_PROMPT,
    negative: str = DEMO_NEGATIVE,
    steps: Sequence[int] = (1, 2, 4, 8),
    seeds: int = 16,
    cfg_scale: float = DEMO_CFG_SCALE,
    nag_scale: float | None = None,
    pipe: Any = None,
    nag_tau: float | None = None,
    nag_alpha: float | None = None,
) -> dict[str, Any]:
    """Generate the demo grid and score every cell.

    Args:
        out: PNG path of the grid.
        prompt: Prompt (toy grammar, e.g. ``"a circle"``, ``"a large shape on a white background"``).
        negative: Negative prompt (e.g. ``"red"``, ``"circle"``, ``"white background"``).
        steps: Step counts (columns).
        seeds: Images per cell (seeds ``0 .. seeds-1``).
        cfg_scale: CFG row's ``true_cfg_scale``.
        nag_scale: NAG row's scale (default: the ``embedded`` preset's).
        pipe: An already loaded embedded pipeline (default: load it).
        nag_tau: NAG row's ``tau`` (default: the ``embedded`` preset's).
        nag_alpha: NAG row's ``alpha`` (default: the ``embedded`` preset's).

    Returns:
        ``{"grid": path, "prompt", "negative", "seconds", "rows": [{"method", "steps": {n: score}}]}``.
    """
    from nagkit.toy.model import load_embedded_pipeline

    started = time.perf_counter()
    pipe = load_embedded_pipeline() if pipe is None else pipe
    seed_list = list(range(seeds))
    rows, cells = [], []
    for method in demo_methods(cfg_scale, nag_scale, nag_tau, nag_alpha):
        row_cells, scores = [], {}
        for n in steps:
            images = generate(pipe, prompt, negative, method, n, seed_list)
            row_cells.append(images)
            scores[n] = score(images, prompt, negative)
        rows.append({"method": method.label, "steps": scores})
        cells.append(row_cells)
    grid = image_grid(cells, [r["method"] for r in rows], [f"{n} step{'s' * (n > 1)}" for n in steps])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return {
        "grid": str(out),
        "prompt": prompt,
        "negative": negative,
        "seeds": seeds,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


def _cell(s: dict[str, float]) -> str:
    return f"{s['negative_rate']:.0%} / {s['fidelity']:.0%}"


def format_demo(result: dict[str, Any]) -> str:
    """Terminal table of :func:`run_demo`'s numbers.

    Args:
        result: :func:`run_demo`'s return value.

    Returns:
        The table.
    """
    steps = list(result["rows"][0]["steps"])
    lines = [
        f'prompt "{result["prompt"]}", negative "{result["negative"]}", {result["seeds"]} seeds per cell',
        "cell = negative-attribute rate / prompt fidelity (judge), lower / higher is better",
        f"{'':<22}" + "".join(f"{f'{n} steps':>16}" for n in steps),
    ]
    for row in result["rows"]:
        cells = "".join(f"{_cell(s):>16}" for s in row["steps"].values())
        lines.append(f"{row['method']:<22}{cells}")
    lines.append(f"grid: {result['grid']}  ({result['seconds']} s)")
    return "\n".join(lines)
