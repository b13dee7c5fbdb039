"""``nagkit demo``: negative prompting on the embedded model, no download — one PNG grid and the judge's numbers.

The model is the embedded few-step student (``embedded``, :func:`nagkit.toy.model.load_student_pipeline`, distilled
by :mod:`nagkit.toy.distill`: sampled without CFG, as FLUX.1-schnell is), the setting NAG was made for.

Rows: no guidance, CFG with the negative (``true_cfg_scale``), NAG (the ``embedded`` preset); columns: 1, 2, 4 and 8
sampling steps. Every cell is generated for the same seeds; the grid shows the first four, the numbers use all. A
title band above the grid states the prompt, the negative, each row's settings and the seeds shown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nagkit.toy.evaluate import Method, generate, image_grid, score

__all__ = [
    "DEMO_CFG_SCALE",
    "DEMO_FORMATS",
    "DEMO_NEGATIVE",
    "DEMO_PROMPT",
    "check_demo_outputs",
    "demo_methods",
    "demo_title",
    "format_demo",
    "run_demo",
]

#: Default demo prompt and negative: the prompt leaves the colour open, the negative excludes one.
DEMO_PROMPT = "a circle"
DEMO_NEGATIVE = "red"
#: CFG scale of the demo's CFG row.
DEMO_CFG_SCALE = 4.0
#: Image formats the grid can be saved in, by (lower-case) suffix of ``out``.
DEMO_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: Images per cell side in the grid (the grid shows the first ``_TILES ** 2`` seeds of each cell).
_TILES = 2
#: Pixel size of the grid's labels and title (PIL's built-in font; the 32 × 32 images are zoomed 3 ×).
_FONT_SIZE = 14


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


def _check_writable(option: str, path: str | Path) -> None:
    """Raise ``ValueError`` naming ``option`` if a file could not be written at ``path`` (nothing is created)."""
    target = Path(os.path.abspath(path))

    def fail(reason: str) -> None:
        raise ValueError(f"{option} {path}: {reason}")

    try:
        if target.is_dir():
            fail("is a directory")
        if target.exists():
            if not os.access(target, os.W_OK):
                fail("exists and is not writable")
            return
        parent = target.parent
        ancestor = parent
        while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            fail(f"cannot create it: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            verb = "write in" if ancestor == parent else f"create {parent} in"
            fail(f"cannot {verb} {ancestor} (not writable: permissions or a read-only file system)")
    except OSError as err:
        fail(f"cannot check it: {err.strerror or err}")


def check_demo_outputs(out: str | Path, json_path: str | Path | None = None) -> None:
    """Check the demo's output paths before any generation work; create nothing.

    Args:
        out: The grid image path (``--out``): its suffix must be ``.png``, ``.jpg``, ``.jpeg`` or ``.webp`` (any case).
        json_path: The numbers' JSON path (``--json``), or ``None``.

    Raises:
        ValueError: One line naming the option, when the suffix of ``out`` is not an image format the grid can be
            saved in, when a path is an existing directory or unwritable file, when its parent is not a directory (e.g.
            an existing file) or cannot be created or written (permissions, read-only file system), or when both
            options name the same file.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in DEMO_FORMATS:
        raise ValueError(
            f"--out {out}: unknown image suffix {suffix or '(none)'!r}; use .png, .jpg, .jpeg or .webp"
        )
    if DEMO_FORMATS[suffix] == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise ValueError(f"--out {out}: this Pillow build cannot write WebP; use .png, .jpg or .jpeg")
    _check_writable("--out", out)
    if json_path is not None:
        _check_writable("--json", json_path)
        if os.path.abspath(json_path) == os.path.abspath(out):
            raise ValueError(f"--json {json_path}: the same file as --out")


def _seed_range(n: int) -> str:
    return "seed 0" if n == 1 else f"seeds 0-{n - 1}"


def demo_title(
    prompt: str,
    negative: str,
    steps: Sequence[int],
    seeds: int,
    cfg_scale: float = DEMO_CFG_SCALE,
    nag_scale: float | None = None,
    nag_tau: float | None = None,
    nag_alpha: float | None = None,
) -> str:
    """The grid's title: prompt, negative, each row's settings, the columns and the seeds shown (ASCII, PIL's
    built-in font has no Greek letters).

    Args:
        prompt, negative, steps, seeds, cfg_scale, nag_scale, nag_tau, nag_alpha: As for :func:`run_demo`.

    Returns:
        The title, one line per ``\n``-separated part.
    """
    from nagkit.core.config import get_preset

    preset = get_preset("embedded")
    nag = demo_methods(cfg_scale, nag_scale, nag_tau, nag_alpha)[2]
    changed = [name for name, value in (("scale", nag.scale), ("tau", nag.tau), ("alpha", nag.alpha))
               if value != getattr(preset, name)]
    origin = "'embedded' preset" if not changed else f"'embedded' preset with {', '.join(changed)} changed"
    shown = min(seeds, _TILES * _TILES)
    return "\n".join([
        f'nagkit demo (embedded few-step student): prompt "{prompt}", negative "{negative}"',
        "rows: none = no guidance (negative ignored) | "
        f"CFG = true_cfg_scale {cfg_scale:g} with the negative | "
        f"NAG = scale {nag.scale:g}, tau {nag.tau:g}, alpha {nag.alpha:g}, {nag.mode} mode ({origin})",
        f"columns: sampling steps {', '.join(str(n) for n in steps)}; each cell shows {_seed_range(shown)}"
        f"{f' ({_TILES}x{_TILES})' if shown == _TILES * _TILES else ''}, the same in every cell; "
        f"scores use {_seed_range(seeds)}",
    ])


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
    progress: bool | Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate the demo grid and score every cell.

    The output path is checked (:func:`check_demo_outputs`) before the model is loaded or anything generated.

    Args:
        out: Image path of the grid; the format follows the suffix (``.png``, ``.jpg`` / ``.jpeg``, ``.webp``).
        prompt: Prompt (toy grammar, e.g. ``"a circle"``, ``"a large shape on a white background"``).
        negative: Negative prompt (e.g. ``"red"``, ``"circle"``, ``"white background"``).
        steps: Step counts (columns).
        seeds: Images per cell (seeds ``0 .. seeds-1``).
        cfg_scale: CFG row's ``true_cfg_scale``.
        nag_scale: NAG row's scale (default: the ``embedded`` preset's).
        pipe: An already loaded embedded pipeline (default: load the few-step student).
        nag_tau: NAG row's ``tau`` (default: the ``embedded`` preset's).
        nag_alpha: NAG row's ``alpha`` (default: the ``embedded`` preset's).
        progress: Progress over the generation work, one tick per generated cell (a row's batch of ``seeds`` images
            at one step count; ``3 × len(steps)`` ticks in all): a callable is called as ``progress(done, total)``
            after each cell; ``True`` shows a ``tqdm`` bar on stderr; ``None`` / ``False`` (default): silent.

    Returns:
        ``{"grid": path, "prompt", "negative", "seeds", "seconds", "rows": [{"method", "steps": {n: score}}],
        "title", "row_labels", "col_labels", "seeds_shown", "format"}``: ``title`` is the text above the grid
        (``\n``-separated lines), ``row_labels`` / ``col_labels`` the grid's labels, ``seeds_shown`` the seeds drawn
        in each cell, ``format`` the PIL format the grid was saved in.

    Raises:
        ValueError: If ``out`` cannot be written or has an unknown suffix (:func:`check_demo_outputs`), or a NAG
            setting is invalid.
        FileNotFoundError: If the embedded weights are missing (``pipe`` not given).
    """
    check_demo_outputs(out)
    methods = demo_methods(cfg_scale, nag_scale, nag_tau, nag_alpha)
    title = demo_title(prompt, negative, steps, seeds, cfg_scale, nag_scale, nag_tau, nag_alpha)
    from nagkit.toy.model import load_student_pipeline

    started = time.perf_counter()
    pipe = load_student_pipeline() if pipe is None else pipe
    seed_list = list(range(seeds))
    total = len(methods) * len(steps)
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="nagkit demo", unit="cell")
    rows, cells = [], []
    try:
        for method in methods:
            row_cells, scores = [], {}
            for n in steps:
                if bar is not None:
                    bar.set_postfix_str(f"{method.kind} {n} step{'s' * (n > 1)}")
                images = generate(pipe, prompt, negative, method, n, seed_list)
                row_cells.append(images)
                scores[n] = score(images, prompt, negative)
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(len(rows) * len(steps) + len(scores), total)
            rows.append({"method": method.label, "steps": scores})
            cells.append(row_cells)
    finally:
        if bar is not None:
            bar.close()
    row_labels = [r["method"] for r in rows]
    col_labels = [f"{n} step{'s' * (n > 1)}" for n in steps]
    grid = image_grid(cells, row_labels, col_labels, tiles=_TILES, title=title, font_size=_FONT_SIZE)
    out = Path(out)
    fmt = DEMO_FORMATS[out.suffix.lower()]
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}))
    return {
        "grid": str(out),
        "prompt": prompt,
        "negative": negative,
        "seeds": seeds,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "title": title,
        "row_labels": row_labels,
        "col_labels": col_labels,
        "seeds_shown": seed_list[: _TILES * _TILES],
        "format": fmt,
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
    lines.append(f"grid: {result['grid']}  (sampling {result['seconds']} s; loading and imports not counted)")
    return "\n".join(lines)
