"""``nagkit bench --quality`` / ``python -m nagkit.bench.quality``: what negative guidance does to images, measured on
the embedded few-step student (1, 2, 4 steps, :mod:`nagkit.toy.distill`) and its many-step teacher (8, 25 steps).

For fixed (prompt, negative) pairs × seeds × columns (a model at a step count), every method (no guidance; CFG at three
scales; NAG ``fast`` and ``official``, the ``embedded`` preset, the Flux preset and a small scale/τ/α grid around the
``embedded`` preset; the experimental VSF and NASA, ``nagkit.apply(..., method=...)``) generates the same seeds, batched
in one pipeline call per cell, and the judge scores the images (:func:`nagkit.toy.evaluate.score_counts`): the rate at
which the negative attribute still appears, prompt fidelity, single-shape rate and off-palette pixels, each with a 95 %
interval (Wilson for rates, normal for the off-palette mean). Pairs whose negative attribute is rare without guidance
(base rate < :data:`BASE_RATE_MIN`, mean over columns) are reported but left out of the summary. Each method's FLOPs per
denoising step on the embedded model (``torch.utils.flop_counter``) stand beside its numbers.

Output: terminal table, JSON, ``docs/quality.md`` with a titled demo grid and a Pareto plot (negative rate against
fidelity, one point per setting, one panel per column). Findings are sentences computed from the numbers. Nothing here
is tuned to make NAG win; the page reports what comes out. Cells can be cached (``--cache``) so an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nagkit.toy.evaluate import Method, generate, image_grid, score_counts, wilson

__all__ = [
    "BASE_RATE_MIN",
    "NAG_EMBEDDED",
    "QUALITY_METHODS",
    "QUALITY_MODELS",
    "QUALITY_PAIRS",
    "QUALITY_SEEDS",
    "QUALITY_STEPS",
    "QUALITY_TEACHER_METHODS",
    "REGENERATE_QUALITY",
    "findings",
    "method_flops",
    "render_quality",
    "run_quality",
    "write_json",
    "write_quality_markdown",
]

REGENERATE_QUALITY = ("python -m nagkit.bench.quality --markdown docs/quality.md --json docs/quality.json "
                      "--cache /tmp/nagkit_quality_cache.json")
#: (prompt, negative) pairs: each prompt leaves the negated attribute open, and the model draws it often without
#: guidance (colour on an under-specified shape, kind on "a shape", the kind it confuses with "circle", a background).
QUALITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("a circle", "red"),
    ("a shape", "circle"),
    ("a circle", "square"),
    ("a shape", "white"),
    ("a shape", "orange background"),
)
#: Columns: step counts, and which model runs each (the student at 1-4 steps, the teacher at 8 and 25).
QUALITY_STEPS: tuple[int, ...] = (1, 2, 4, 8, 25)
QUALITY_MODELS: dict[int, str] = {1: "student", 2: "student", 4: "student", 8: "teacher", 25: "teacher"}
#: Seeds per cell (seeds 0 .. 63; the held-out test uses others).
QUALITY_SEEDS = 64
#: Pairs whose base rate (no guidance, mean over columns) is below this are reported but not summarised.
BASE_RATE_MIN = 0.2
#: NAG at the ``embedded`` preset (scale 8, τ 5, α 1; see ``nagkit.PRESETS``).
NAG_EMBEDDED = Method("nag", 8.0, 5.0, 1.0)
CFG_REFERENCE = Method("cfg", 4.0)
VSF_DEFAULT = Method("vsf", 3.5)
NASA_DEFAULT = Method("nasa", 0.25)
#: Methods compared. NAG rows without τ/α use the Flux preset's (2.5, 0.25); VSF β 3.5 and NASA φ 0.25 are the
#: defaults of ``NAGConfig(method=...)``; NASA's stronger second value shows whether it needs more on this model.
QUALITY_METHODS: tuple[Method, ...] = (
    Method("none"),
    Method("cfg", 2.0),
    CFG_REFERENCE,
    Method("cfg", 7.0),
    NAG_EMBEDDED,
    Method("nag", 8.0, 5.0, 1.0, mode="official"),
    Method("nag", 5.0),
    Method("nag", 16.0, 5.0, 1.0),
    Method("nag", 8.0, 2.5, 1.0),
    Method("nag", 8.0, 5.0, 0.5),
    VSF_DEFAULT,
    NASA_DEFAULT,
    Method("nasa", 1.0),
)
#: Methods run on the teacher's columns (8 and 25 steps): the same full set as on the student, in the same run.
QUALITY_TEACHER_METHODS: tuple[str, ...] = tuple(m.label for m in QUALITY_METHODS)
_GRID_METHODS = (Method("none"), CFG_REFERENCE, NAG_EMBEDDED, VSF_DEFAULT)
_GRID_STEPS = (1, 2, 4)
_GRID_SEEDS = 4


def _column(n: int, models: dict[int, str]) -> str:
    return f"{models.get(n, 'model')} {n} step{'s' * (n > 1)}"


def method_flops(pipe: Any, method: Method, prompt: str = "a circle", negative: str = "red") -> int:
    """FLOPs of one denoising step of ``method`` on ``pipe`` (one image): a 2-step call minus a 1-step call, both
    counted with ``torch.utils.flop_counter`` (text encoding, the negative's encoding and decoding cancel).

    Args:
        pipe: The embedded pipeline.
        method: The method.
        prompt: Prompt.
        negative: Negative.

    Returns:
        FLOPs per step (matmuls and attention; a multiply-add counts 2).
    """
    from nagkit.bench.flops import count_flops

    counts = [count_flops(lambda n=n: generate(pipe, prompt, negative, method, n, [0])) for n in (1, 2)]
    return counts[1] - counts[0]


def _method_available(method: Method) -> str | None:
    """``None`` if ``method`` can run, else why not (VSF/NASA need ``NAGConfig.method``)."""
    if method.kind not in ("vsf", "nasa"):
        return None
    import dataclasses

    from nagkit.core.config import NAGConfig

    if "method" not in {f.name for f in dataclasses.fields(NAGConfig)}:
        return "nagkit.core.config.NAGConfig has no `method` field yet (VSF/NASA not installed)"
    return None


def _cell_from_counts(c: dict[str, Any]) -> dict[str, float]:
    """The legacy score cell (``nagkit.toy.evaluate.score``'s keys) from counts."""
    n = c["n"]
    return {"n": n, "negative_rate": c["negative"] / n, "fidelity": c["fidelity"] / n,
            "off_palette": c["off_palette"], "confidence": c["confidence"]}


def _pool(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool count cells (several pairs) into rates with Wilson intervals and a normal interval of the off-palette
    mean."""
    n = sum(c["n"] for c in cells)
    out: dict[str, Any] = {"n": n}
    for key, name in (("negative", "negative_rate"), ("fidelity", "fidelity"), ("single_shape", "single_shape")):
        k = sum(c[key] for c in cells)
        out[name] = k / n
        out[f"{name}_ci"] = list(wilson(k, n))
    s1 = sum(c["off_palette"] * c["n"] for c in cells)
    s2 = sum((c["off_palette_sd"] ** 2) * (c["n"] - 1) + c["n"] * c["off_palette"] ** 2 for c in cells)
    mean = s1 / n
    var = max(0.0, (s2 - n * mean * mean) / max(1, n - 1))
    half = 1.959964 * math.sqrt(var / n)
    out["off_palette"] = mean
    out["off_palette_ci"] = [max(0.0, mean - half), mean + half]
    out["confidence"] = sum(c["confidence"] * c["n"] for c in cells) / n
    return out


def _fingerprint(pipe: Any) -> str:
    """A short fingerprint of a pipeline's denoiser weights (cache validity)."""
    try:
        return f"{sum(float(p.double().sum()) for p in pipe.transformer.parameters()):.10e}"
    except AttributeError:
        return type(pipe).__name__


def _load_pipes(models: dict[int, str]) -> dict[str, Any]:
    from nagkit.toy.model import load_embedded_pipeline, load_student_pipeline

    loaders = {"student": load_student_pipeline, "teacher": load_embedded_pipeline}
    return {name: loaders[name]() for name in sorted(set(models.values()))}


def run_quality(
    pairs: Sequence[tuple[str, str]] = QUALITY_PAIRS,
    methods: Sequence[Method] = QUALITY_METHODS,
    steps: Sequence[int] = QUALITY_STEPS,
    seeds: int = QUALITY_SEEDS,
    pipe: Any = None,
    progress: Callable[[str], None] | None = None,
    models: dict[int, str] | None = None,
    pipes: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    flops: bool = True,
    model_methods: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run the quality benchmark.

    Args:
        pairs: (prompt, negative) pairs.
        methods: Methods to compare (same seeds for all).
        steps: Step counts (columns).
        seeds: Images per cell: seeds ``0 .. seeds-1``.
        pipe: One pipeline for every column (then ``models`` only names it); default: the student and the teacher
            as :data:`QUALITY_MODELS` says.
        progress: Called with one line per (pair, method).
        models: Which model runs each step count (default :data:`QUALITY_MODELS`; with ``pipe``: ``"model"``).
        pipes: Already loaded pipelines by model name.
        cache: JSON file of finished cells (read, and rewritten after each pair): a rerun skips them.
        flops: Count each method's FLOPs per step.
        model_methods: Labels of the methods to run on a model's columns (others: all methods); default, without
            ``pipe``: the teacher runs :data:`QUALITY_TEACHER_METHODS`.

    Returns:
        The report: ``{"pairs": [{"prompt", "negative", "methods": {label: {steps: score}}, "stats": {label: {steps:
        counts + intervals}}, "base_rate", "measurable", "fast_vs_official"}], "summary": {label: {steps: pooled
        rates with intervals}}, "models", "flops", "findings", "machine", "seconds", ...}``; the demo grid image is
        under the private key ``"_grid"``.

    Raises:
        ValueError: If ``seeds`` < 1.
    """
    from nagkit.toy.model import embedded_info, student_info

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    started = time.perf_counter()
    if pipe is not None:
        models = {n: (models or {}).get(n, "model") for n in steps}
        pipes = {name: pipe for name in set(models.values())}
        model_methods = model_methods or {}
    else:
        models = {n: (models or QUALITY_MODELS).get(n, "teacher") for n in steps}
        pipes = pipes or _load_pipes(models)
        model_methods = {"teacher": QUALITY_TEACHER_METHODS} if model_methods is None else model_methods
    cache_path = Path(cache) if cache else None
    cached: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    prints = cached.setdefault("_fingerprints", {})
    for name, p in pipes.items():  # cells of other weights than these are stale: drop them
        fp = _fingerprint(p)
        if prints.get(name, fp) != fp:
            cached = {k: v for k, v in cached.items() if not k.startswith(f"{name}|")}
            prints = cached["_fingerprints"]
        prints[name] = fp
    seed_list = list(range(seeds))
    skipped = {m.label: why for m in methods if (why := _method_available(m))}
    runnable = [m for m in methods if m.label not in skipped]

    def key(model: str, prompt: str, negative: str, label: str, n: int) -> str:
        return f"{model}|{prompt}|{negative}|{label}|{n}|{seeds}"

    out_pairs = []
    counted = {"computed": 0, "cached": 0}
    for prompt, negative in pairs:
        by_method: dict[str, dict[int, dict[str, float]]] = {}
        stats: dict[str, dict[int, dict[str, Any]]] = {}
        gaps: dict[str, dict[int, float]] = {}
        images: dict[tuple[str, int], list[Any]] = {}
        for method in runnable:
            t0 = time.perf_counter()
            by_method[method.label], stats[method.label] = {}, {}
            for n in steps:
                if models[n] in model_methods and method.label not in model_methods[models[n]]:
                    continue
                k = key(models[n], prompt, negative, method.label, n)
                entry = cached.get(k)
                counted["cached" if entry is not None else "computed"] += 1
                fast = method.label.replace("(official)", "(fast)") if method.mode == "official" else None
                if entry is None:
                    ims = generate(pipes[models[n]], prompt, negative, method, n, seed_list)
                    images[(method.label, n)] = ims
                    entry = {"counts": score_counts(ims, prompt, negative)}
                    if fast and any(m.label == fast for m in runnable):
                        ref = images.get((fast, n))
                        if ref is None:
                            ref = generate(pipes[models[n]], prompt, negative, Method(**{
                                **method.__dict__, "mode": "fast"}), n, seed_list)
                        entry["gap"] = float(np.mean([
                            np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                            for a, b in zip(ref, ims, strict=True)]))
                    cached[k] = entry
                c = entry["counts"]
                by_method[method.label][n] = _cell_from_counts(c)
                stats[method.label][n] = {**c, **{f"{name}_ci": list(wilson(c[cnt], c["n"])) for cnt, name in (
                    ("negative", "negative_rate"), ("fidelity", "fidelity"), ("single_shape", "single_shape"))}}
                if "gap" in entry:
                    gaps.setdefault(method.label.removesuffix(" (official)"), {})[n] = entry["gap"]
            if progress:
                rates = " ".join(f"{n}:{_cell(s)}" for n, s in by_method[method.label].items())
                progress(f'"{prompt}" − "{negative}" {method.label:<22} {rates}  ({time.perf_counter() - t0:.0f} s)')
            if cache_path:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps(cached))
        base = {n: c["negative_rate"] for n, c in by_method["none"].items()} if "none" in by_method else {}
        measurable = not base or float(np.mean(list(base.values()))) >= BASE_RATE_MIN
        out_pairs.append({"prompt": prompt, "negative": negative, "methods": by_method, "stats": stats,
                          "base_rate": base, "measurable": measurable, "fast_vs_official": gaps})
    distillation: dict[str, dict[int, Any]] = {}
    student_steps = [n for n in steps if models[n] == "student"]
    if pipe is None and "student" in pipes and student_steps:
        # the teacher without guidance at the student's step counts, next to both models' own columns (all pairs)
        teacher = pipes.get("teacher")
        if teacher is None:
            from nagkit.toy.model import load_embedded_pipeline

            teacher = load_embedded_pipeline()
        cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for prompt, negative in pairs:
            for n in student_steps:
                k = key("teacher", prompt, negative, "none", n)
                if k not in cached:
                    ims = generate(teacher, prompt, negative, Method("none"), n, seed_list)
                    cached[k] = {"counts": score_counts(ims, prompt, negative)}
                cells.setdefault(("teacher", n), []).append(cached[k]["counts"])
        for pr in out_pairs:
            for n in steps:
                if n in pr["stats"].get("none", {}):
                    cells.setdefault((models[n], n), []).append(pr["stats"]["none"][n])
        for (name, n), group in sorted(cells.items()):
            distillation.setdefault(name, {})[n] = _pool(group)
        if cache_path:
            cache_path.write_text(json.dumps(cached))
    kept = [pr for pr in out_pairs if pr["measurable"]] or out_pairs
    summary = {m.label: {n: _pool([pr["stats"][m.label][n] for pr in kept]) for n in steps
                         if all(n in pr["stats"][m.label] for pr in kept)} for m in runnable}
    grid = _demo_grid(pairs[0], pipes, models, runnable) if pairs else None
    cost: dict[str, Any] = {}
    if flops:
        column = next(iter(steps))
        for m in runnable:
            cost[m.label] = method_flops(pipes[models[column]], m, *pairs[0]) if pairs else None
    import torch

    report = {
        "seeds": seeds,
        "steps": list(steps),
        "models": {n: models[n] for n in steps},
        "methods": [m.label for m in runnable],
        "skipped_methods": skipped,
        "pairs": out_pairs,
        "summarised_pairs": [f'"{pr["prompt"]}" − "{pr["negative"]}"' for pr in kept],
        "summary": summary,
        "distillation": distillation,
        "flops_per_step": cost,
        "model": {k: v for k, v in embedded_info().items() if k != "log"},
        "student": {k: v for k, v in student_info().items() if k != "log"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "cells": counted,
        "_grid": grid,
    }
    report["findings"] = findings(report)
    return report


def _demo_grid(pair: tuple[str, str], pipes: dict[str, Any], models: dict[int, str],
               methods: Sequence[Method]) -> Any:
    """The titled demo grid: rows none / CFG 4 / NAG (``embedded`` preset) / VSF on the student at 1, 2, 4 steps."""
    rows = [m for m in _GRID_METHODS if m.label in {x.label for x in methods}]
    steps = list(_GRID_STEPS)
    if len(rows) < 2 or not all(n in models for n in steps):
        return None
    prompt, negative = pair
    seeds = list(range(_GRID_SEEDS))
    cells = [[generate(pipes[models[n]], prompt, negative, m, n, seeds) for n in steps] for m in rows]
    settings = "; ".join({"none": "none = no guidance", "cfg": f"CFG = true_cfg_scale {CFG_REFERENCE.scale:g}",
                          "nag": f"NAG = scale {NAG_EMBEDDED.scale:g}, tau {NAG_EMBEDDED.tau:g}, alpha "
                                 f"{NAG_EMBEDDED.alpha:g} ('embedded' preset, fast)",
                          "vsf": f"VSF = beta {VSF_DEFAULT.scale:g} (default offset)"}[m.kind] for m in rows)
    title = (f'prompt "{prompt}", negative "{negative}"; {", ".join(sorted({models[n] for n in steps}))} at '
             f'{", ".join(map(str, steps))} steps, no CFG unless the row says so\nrows: {settings}\n'
             f"each cell: seeds 0-{_GRID_SEEDS - 1} (2x2), the same in every cell")
    labels = [m.label.replace("β", "beta ").replace("φ", "phi ") for m in rows]  # PIL's font has no Greek letters
    return image_grid(cells, labels, [_column(n, models) for n in steps], title=title, font_size=13)


def _fmt_rate(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.0%} [{lo * 100:.0f}–{hi * 100:.0f}]"


def _separated(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether two 95 % intervals of ``key`` do not overlap."""
    return a[f"{key}_ci"][1] < b[f"{key}_ci"][0] or b[f"{key}_ci"][1] < a[f"{key}_ci"][0]


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` is at least as good as ``b`` on both axes (lower negative rate, higher fidelity) and better on one."""
    return (a["negative_rate"] <= b["negative_rate"] and a["fidelity"] >= b["fidelity"]
            and (a["negative_rate"] < b["negative_rate"] or a["fidelity"] > b["fidelity"]))


def pareto_front(summary: dict[str, dict[int, dict[str, Any]]], n: int) -> list[str]:
    """Labels of the settings no other setting dominates at step count ``n`` (among those with a cell there)."""
    at = {label: row[n] for label, row in summary.items() if n in row}
    return [a for a in at if not any(_dominates(at[b], at[a]) for b in at if b != a)]


def findings(report: dict[str, Any], nag: str | None = None, cfg: str = "CFG 4") -> list[str]:
    """Sentences computed from the numbers (no hand-written figures): per column, the ``embedded`` NAG preset against
    no guidance, CFG, VSF and NASA with intervals; whether its drop is separated from no guidance; the Pareto front;
    where NAG loses (another method with a lower negative rate and no lower fidelity); ``fast`` vs ``official``.

    Args:
        report: :func:`run_quality`'s report (``summary`` filled).
        nag: Label of the NAG setting to describe (default: the ``embedded`` preset's, else the first NAG one).
        cfg: Label of the CFG setting to compare with.

    Returns:
        Markdown bullet lines.
    """
    summary = report["summary"]
    models = report.get("models", {})
    if nag is None:
        nags = [label for label in summary if label.startswith("NAG")]
        nag = NAG_EMBEDDED.label if NAG_EMBEDDED.label in summary else (nags[0] if nags else "")
    if not {"none", nag, cfg} <= set(summary):
        return []
    out = []
    distill = report.get("distillation") or {}
    ref = max(distill.get("teacher", {}), default=None)
    if "student" in distill and ref is not None:
        parts = []
        for n, s in distill["student"].items():
            t = distill["teacher"].get(n)
            own = (f" (teacher at {n}: {t['off_palette']:.1%}, {t['single_shape']:.0%})" if t else "")
            parts.append(f"{n} step{'s' * (n > 1)}: off-palette {s['off_palette']:.1%}, single shape "
                         f"{s['single_shape']:.0%}{own}")
        r = distill["teacher"][ref]
        out.append(f"* Distillation, no guidance: student {'; '.join(parts)}; teacher at {ref} steps: off-palette "
                   f"{r['off_palette']:.1%}, single shape {r['single_shape']:.0%}.")
    steps = [n for n in report["steps"] if all(n in summary[x] for x in ("none", nag, cfg))]
    for n in steps:
        a, b, c = summary["none"][n], summary[nag][n], summary[cfg][n]
        others = [x for x in (VSF_DEFAULT.label, NASA_DEFAULT.label) if x in summary and n in summary[x]]
        rest = "".join(f"; {x} {_fmt_rate(summary[x][n], 'negative_rate')} / {summary[x][n]['fidelity']:.0%}"
                       for x in others)
        sep = "separated from" if _separated(a, b, "negative_rate") else "not separated from"
        out.append(
            f"* {_column(n, models)}: negative rate {_fmt_rate(a, 'negative_rate')} (none) → "
            f"{_fmt_rate(b, 'negative_rate')} ({nag}; {sep} none at 95 %) vs {_fmt_rate(c, 'negative_rate')} ({cfg})"
            f"{rest}; fidelity {a['fidelity']:.0%} (none) → {b['fidelity']:.0%} ({nag}) vs {c['fidelity']:.0%} "
            f"({cfg}); "
            f"off-palette {a['off_palette']:.1%} → {b['off_palette']:.1%} vs {c['off_palette']:.1%}."
        )
    for n in steps:
        front = pareto_front(summary, n)
        out.append(f"* Pareto front (negative rate vs fidelity), {_column(n, models)}: {', '.join(front)}.")
    for n in steps:
        beaters = [x for x in summary if not x.startswith("NAG") and x != "none" and n in summary[x]
                   and _dominates(summary[x][n], summary[nag][n])]
        nags = [x for x in summary if x.startswith("NAG") and n in summary[x]]
        best = [x for x in beaters if not any(_dominates(summary[g][n], summary[x][n]) for g in nags)]
        if beaters:
            out.append(f"* NAG loses at {_column(n, models)}: {', '.join(beaters)} reach a lower negative rate with "
                       f"no lower fidelity than {nag}" + (f"; no NAG setting of the grid matches {', '.join(best)}"
                                                          if best else "") + ".")
    student = [n for n in steps if models.get(n) == "student"]
    if student:
        nag_wins = [n for n in student if summary[nag][n]["negative_rate"] < summary["none"][n]["negative_rate"]
                    and summary[nag][n]["fidelity"] - summary["none"][n]["fidelity"]
                    >= summary[cfg][n]["fidelity"] - summary["none"][n]["fidelity"]
                    and _separated(summary["none"][n], summary[nag][n], "negative_rate")]
        wins = ", ".join(f"{n} step{'s' * (n > 1)}" for n in nag_wins) or "none of them"
        out.append(f"* On the student (at {', '.join(map(str, student))} steps), {nag} removes the negative attribute "
                   f"(interval separated from none) with no more fidelity loss than {cfg} at: {wins}.")
    official = nag.replace("(fast)", "(official)")
    both = [n for n in steps if official in summary and n in summary[official]]
    if both:
        d = [summary[official][n]["negative_rate"] - summary[nag][n]["negative_rate"] for n in both]
        f = [summary[official][n]["fidelity"] - summary[nag][n]["fidelity"] for n in both]
        dn = ", ".join(f"{x * 100:+.0f}" for x in d)
        df = ", ".join(f"{x * 100:+.0f}" for x in f)
        out.append(f"* `official` − `fast` mode, {nag.removesuffix(' (fast)')}: negative rate {dn} points, "
                   f"fidelity {df} points (per step count {', '.join(map(str, both))}).")
    cost = report.get("flops_per_step") or {}
    if cost.get("none") and cost.get(nag):
        rel = ", ".join(f"{x} {cost[x] / cost['none']:.2f}×" for x in (nag, cfg, VSF_DEFAULT.label,
                                                                      NASA_DEFAULT.label) if cost.get(x))
        out.append(f"* FLOPs per step relative to no guidance: {rel}.")
    return out


def _cell(s: dict[str, float]) -> str:
    return f"{s['negative_rate']:.0%} / {s['fidelity']:.0%}"


def render_quality(report: dict[str, Any]) -> str:
    """Terminal table: pooled over the summarised pairs, negative rate / fidelity per method and column.

    Args:
        report: :func:`run_quality`'s report.

    Returns:
        The table.
    """
    steps = report["steps"]
    models = report.get("models", {})
    lines = [f"pooled over {len(report.get('summarised_pairs', report['pairs']))} (prompt, negative) pairs × "
             f"{report['seeds']} seeds; cell = negative-attribute rate / prompt fidelity",
             f"{'method':<22}" + "".join(f"{_column(n, models):>18}" for n in steps)]
    for label, row in report["summary"].items():
        lines.append(f"{label:<22}" + "".join(f"{_cell(row[n]) if n in row else '–':>18}" for n in steps))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report (without images) as JSON.

    Args:
        report: :func:`run_quality`'s report.
        path: Output path.

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=1))
    return path


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _training_section() -> list[str]:
    """The embedded teacher's training record (shipped next to its weights) as Markdown."""
    from nagkit.toy.model import embedded_info

    record = embedded_info()
    if not record:
        return []
    params = record.get("parameters", {})
    lines = [
        "## The embedded model's training",
        "",
        f"`{record.get('command', 'python -m nagkit.toy.train')}`: {record['steps']} steps × batch "
        f"{record['batch_size']}, AdamW lr {record['lr']:g} (warm-up {record['warmup']}, cosine to 10 %), seed "
        f"{record['seed']}, {record['empty_prob']:.0%} empty captions, kinds {', '.join(record['kinds'])}"
        + _curriculum_note(record)
        + "; "
        f"{record['minutes']:.1f} min wall time on {record['threads']} CPU threads (torch {record['torch']})"
        + _pace_note(record)
        + "; "
        f"final loss {record['final_loss']:.4f}."
        + _autoencoder_note(record)
        + " Parameters: "
        + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items())
        + f"; weights file {record['weights_bytes'] / 2**20:.1f} MiB.",
        "",
        "| step | loss |",
        "|---:|---:|",
    ]
    log = record.get("log", [])
    every = max(1, len(log) // 12)
    lines += [f"| {r['step']} | {r['loss']:.4f} |" for i, r in enumerate(log) if i % every == 0 or i == len(log) - 1]
    return [*lines, ""]


def _student_section() -> list[str]:
    """The few-step student's distillation record as Markdown."""
    from nagkit.toy.model import student_info

    record = student_info()
    if not record:
        return []
    lines = [
        "## The student's distillation",
        "",
        f"`{record.get('command', 'python -m nagkit.toy.distill --install')}`: {record['method']}. "
        f"{record['pairs']} teacher pairs (noise → "
        f"the teacher's {record['teacher_steps']}-step Euler sample, captions of the teacher's training mixture), "
        f"{record['pair_minutes']:.1f} min; then {record['steps']} steps × batch {record['batch_size']}, AdamW lr "
        f"{record['lr']:g}, σ from {{1, 3/4, 1/2, 1/4}} for {record['discrete_prob']:.0%} of each batch, "
        f"{record['train_minutes']:.1f} min (median {record['median_seconds_per_step']:.2f} s per step) on "
        f"{record['threads']} CPU threads; final loss "
        f"{record['final_loss']:.4f}; weights file ({record['weights_dtype']}, transformer only) "
        f"{record['weights_bytes'] / 2**20:.1f} MiB." + (f" {record['notes']}" if record.get("notes") else ""),
        "",
    ]
    return lines


def _curriculum_note(record: dict[str, Any]) -> str:
    n = record.get("simple_steps", 0)
    return f", the first {n} steps on one-shape scenes with fully specified captions" if n else ""


def _autoencoder_note(record: dict[str, Any]) -> str:
    ae = record.get("autoencoder")
    if not ae:
        return ""
    return (f" The autoencoder was trained first: {ae['steps']} steps (lr {ae['lr']:g}, KL weight "
            f"{ae['kl_weight']:g}), {ae['minutes']:.1f} min, final reconstruction MSE {ae['final_mse']:.4f}; "
            f"the transformer then trained on its standardised latents (scale {ae['scaling_factor']:.3f}, shift "
            f"{ae['shift_factor']:.3f}).")


def _pace_note(record: dict[str, Any]) -> str:
    pace = record.get("median_seconds_per_step")
    if not pace:
        return ""
    ae_minutes = record.get("autoencoder", {}).get("minutes", 0.0)
    paced = pace * record["steps"] / 60 + ae_minutes
    stage = " + the autoencoder's minutes" if ae_minutes else ""
    if record["minutes"] <= 1.05 * paced:
        return f", median {pace:.2f} s per step (the machine was not shared: wall time ≈ pace × steps{stage})"
    return (f", median {pace:.2f} s per step = {paced:.0f} min (with the autoencoder stage) without the stretches "
            "where other jobs shared the CPU")


def pareto_plot(report: dict[str, Any], path: str | Path) -> Path | None:
    """Pareto PNG: negative rate (lower better) against fidelity (higher better), one point per method setting with
    its 95 % intervals, one panel per column.

    Args:
        report: :func:`run_quality`'s report.
        path: PNG path.

    Returns:
        The path, or ``None`` if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, models, summary = report["steps"], report.get("models", {}), report["summary"]
    colours = {"none": "black", "CFG": "tab:blue", "NAG": "tab:red", "VSF": "tab:green", "NASA": "tab:purple"}
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 4.6), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], steps, strict=True):
        front = set(pareto_front(summary, n))
        for label, row in summary.items():
            if n not in row:
                continue
            r = row[n]
            family = label.split(" ")[0]
            colour = colours.get(family, "gray")
            ax.errorbar(r["fidelity"], r["negative_rate"],
                        xerr=[[r["fidelity"] - r["fidelity_ci"][0]], [r["fidelity_ci"][1] - r["fidelity"]]],
                        yerr=[[r["negative_rate"] - r["negative_rate_ci"][0]],
                              [r["negative_rate_ci"][1] - r["negative_rate"]]],
                        fmt="o" if label in front else "x", color=colour, alpha=0.35, ms=4, lw=0.6)
            ax.annotate(label.replace(" (fast)", "").replace(" (official)", " off."), (r["fidelity"],
                        r["negative_rate"]), fontsize=6, color=colour, xytext=(2, 2), textcoords="offset points")
        ax.set_title(_column(n, models))
        ax.set_xlabel("prompt fidelity (higher is better)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("negative-attribute rate (lower is better)")
    fig.suptitle(f"Negative rate vs fidelity, pooled over {len(report.get('summarised_pairs', []))} pairs × "
                 f"{report['seeds']} seeds (95 % Wilson intervals; o = Pareto front)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_quality_markdown(report: dict[str, Any], path: str | Path) -> tuple[Path, Path | None]:
    """Write ``docs/quality.md`` (and, next to it, ``<stem>_grid.png`` and ``<stem>_pareto.png``).

    Args:
        report: :func:`run_quality`'s report.
        path: Markdown path.

    Returns:
        ``(markdown path, grid path or None)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_path = None
    if report.get("_grid") is not None:
        grid_path = path.with_name(f"{path.stem}_grid.png")
        report["_grid"].save(grid_path)
    pareto = pareto_plot(report, path.with_name(f"{path.stem}_pareto.png")) if report["pairs"] else None
    steps = report["steps"]
    models = report.get("models", {})
    cols = [_column(n, models) for n in steps]
    lines = [
        "# Quality: what negative guidance does on the embedded few-step student and its teacher",
        "",
        "<!-- Generated by `python -m nagkit.bench.quality`; edit src/nagkit/bench/quality.py, not this file. -->",
        "",
        f"Regenerate with `{REGENERATE_QUALITY}`. This run: {report['seconds'] / 60:.0f} min on "
        f"{report['machine']['threads']} CPU threads ({report['machine']['cpu']}), "
        f"{report.get('cells', {}).get('computed', '?')} cells computed and {report.get('cells', {}).get('cached', 0)} "
        "read from the cache of earlier runs of the same command (a cell is recomputed when its model's weights "
        "change).",
        "",
        "The embedded model is a FLUX-architecture pipeline trained by nagkit on procedural scenes (the *teacher*, "
        "`embedded-teacher`); the *student* (`embedded`, the default model) is distilled from it to sample in 1-4 "
        "steps without CFG, as FLUX.1-schnell does (`nagkit.toy.distill`). Columns: the student at 1, 2, 4 steps and "
        "the teacher at 8 and 25. Every method generates the same seeds; the judge (`nagkit.toy.judge`, rules on "
        f"pixels) reads each image. {report['seeds']} seeds per cell; every rate comes with its 95 % Wilson interval "
        "`[low–high]`.",
        "",
        "* **negative rate**: fraction of images that still show the negative attribute (lower is better);",
        "* **fidelity**: fraction that satisfy everything the prompt says (higher is better);",
        "* **single shape**: fraction with exactly one shape (every prompt asks for one);",
        "* **off-palette**: mean fraction of pixels far from every palette colour (smears, artifacts; lower is "
        "better), with a normal 95 % interval.",
        "",
        "Methods: CFG is true classifier-free guidance with the negative as `negative_prompt` (`true_cfg_scale`, two "
        "passes; outside the student's training regime); NAG uses the negative as NAG negative, no CFG: `NAG 8 τ5 α1` "
        "is the `embedded` preset, `NAG 5` the Flux preset (τ 2.5, α 0.25), the other NAG rows vary one of scale/τ/α "
        "around the `embedded` preset; VSF (Value Sign Flip, arXiv 2508.10931) and NASA (arXiv 2412.02687) are "
        "`nagkit.apply(..., method=\"vsf\"|\"nasa\")` (experimental), β / φ as labelled. "
        + ("Every method runs on the student and on the teacher, in the same run."
           if {m.label for m in QUALITY_METHODS} <= set(QUALITY_TEACHER_METHODS) else
           "The full set runs on the student; the teacher's columns run the settings in `QUALITY_TEACHER_METHODS`: "
           "`–` marks the cells not run."),
        "",
    ]
    if report.get("skipped_methods"):
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in report["skipped_methods"].items()), ""]
    if grid_path is not None:
        first = report["pairs"][0]
        lines += [f'## Demo grid: "{first["prompt"]}", negative "{first["negative"]}"', "",
                  f"![grid]({grid_path.name})", ""]
    if report.get("findings"):
        lines += ["## Findings (computed from the numbers below)", "", *report["findings"], ""]
    summarised = report.get("summarised_pairs", [])
    lines += ["## Summary", "", f"Pooled over the pairs whose base rate is at least {BASE_RATE_MIN:.0%}: "
              f"{', '.join(summarised)}. Cell: negative rate [95 % CI] / fidelity [95 % CI].", ""]
    lines += _md_table(["method", *cols],
                       [[label, *(f"{_fmt_rate(row[n], 'negative_rate')} / {_fmt_rate(row[n], 'fidelity')}"
                                  if n in row else "–" for n in steps)] for label, row in report["summary"].items()])
    lines += ["", "Artifacts: off-palette % [95 % CI] / single-shape rate [95 % CI].", ""]
    lines += _md_table(["method", *cols],
                       [[label, *(f"{row[n]['off_palette']:.1%} [{row[n]['off_palette_ci'][0] * 100:.1f}–"
                                  f"{row[n]['off_palette_ci'][1] * 100:.1f}] / {_fmt_rate(row[n], 'single_shape')}"
                                  if n in row else "–" for n in steps)] for label, row in report["summary"].items()])
    cost = report.get("flops_per_step") or {}
    if cost:
        base = cost.get("none")
        lines += ["", "## Cost", "", "FLOPs of one denoising step on the embedded model (one image; "
                  "`torch.utils.flop_counter`: a 2-step call minus a 1-step call).", ""]
        lines += _md_table(["method", "MFLOP per step", "× none"],
                           [[label, f"{v / 1e6:.1f}", f"{v / base:.2f}" if base else "?"]
                            for label, v in cost.items() if v is not None])
    if pareto is not None:
        lines += ["", "## Pareto plot", "", f"![pareto]({pareto.name})", ""]
    lines += ["", "## Base rates (no guidance)", ""]
    lines += _md_table(["pair", *cols, "summarised"],
                       [[f'"{pr["prompt"]}" − "{pr["negative"]}"',
                         *(f"{pr['base_rate'].get(n, float('nan')):.0%}" for n in steps),
                         "yes" if pr["measurable"] else "no (base rate too low)"] for pr in report["pairs"]])
    lines += ["", "## Per pair", ""]
    for pr in report["pairs"]:
        lines += [f'### "{pr["prompt"]}", negative "{pr["negative"]}"', "",
                  "Cell: negative rate [95 % CI] / fidelity.", ""]
        rows = []
        for label, row in pr["stats"].items():
            cells = [f"{_fmt_rate({**row[n], 'negative_rate': row[n]['negative'] / row[n]['n']}, 'negative_rate')} / "
                     f"{row[n]['fidelity'] / row[n]['n']:.0%}" if n in row else "–" for n in steps]
            rows.append([label, *cells])
        lines += _md_table(["method", *cols], rows)
        lines.append("")
    gaps = [(pr["prompt"], pr["negative"], scale, g) for pr in report["pairs"]
            for scale, g in pr["fast_vs_official"].items()]
    if gaps:
        lines += ["## `fast` vs `official` mode (same seeds)", "",
                  "Mean absolute pixel difference between the two modes' images (fraction of full range).", ""]
        lines += _md_table(["pair", "NAG", *cols],
                           [[f'"{p}" − "{n_}"', s, *(f"{g[n]:.3f}" if n in g else "–" for n in steps)]
                            for p, n_, s, g in gaps])
        lines.append("")
    lines += _student_section()
    distill = report.get("distillation") or {}
    if distill:
        lines += ["### Does the student draw what the teacher draws at 25 steps?", "",
                  f"No guidance, pooled over all {len(report['pairs'])} pairs' prompts × {report['seeds']} seeds: "
                  "off-palette % [95 % CI] / single-shape rate [95 % CI] / fidelity.", ""]
        all_steps = sorted({n for row in distill.values() for n in row})
        lines += _md_table(["model", *(f"{n} step{'s' * (n > 1)}" for n in all_steps)],
                           [[name, *(f"{row[n]['off_palette']:.1%} [{row[n]['off_palette_ci'][0] * 100:.1f}–"
                                     f"{row[n]['off_palette_ci'][1] * 100:.1f}] / {_fmt_rate(row[n], 'single_shape')}"
                                     f" / {row[n]['fidelity']:.0%}" if n in row else "–" for n in all_steps)]
                            for name, row in distill.items()])
        lines.append("")
    lines += _training_section()
    path.write_text("\n".join(lines))
    return path, grid_path


def main(argv: list[str] | None = None) -> int:
    """``python -m nagkit.bench.quality``: run the benchmark and write the report.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    import sys

    p = argparse.ArgumentParser(prog="python -m nagkit.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=QUALITY_SEEDS)
    p.add_argument("--steps", type=int, nargs="+", default=list(QUALITY_STEPS))
    p.add_argument("--cache", default=None, help="JSON cache of finished cells (resume)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_quality(steps=args.steps, seeds=args.seeds, progress=progress, cache=args.cache)
    print(render_quality(report))
    if args.json:
        print(write_json(report, args.json))
    if args.markdown:
        page, grid = write_quality_markdown(report, args.markdown)
        print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
