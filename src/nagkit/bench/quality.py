"""``nagkit bench --quality``: what negative guidance does to images, measured on the embedded model.

For fixed (prompt, negative) pairs × seeds × step counts, every method (no guidance, CFG at several scales, NAG at
several scales, NAG ``fast`` and ``official`` modes) generates the same seeds and the judge scores the images
(:func:`nagkit.toy.evaluate.score`): the rate at which the negative attribute still appears, prompt fidelity, and two
artifact measures (off-palette pixels, judge confidence). Output: terminal table, JSON, ``docs/quality.md`` with a
grid image. Nothing here is tuned to make NAG win; the page reports what comes out.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nagkit.toy.evaluate import Method, generate, image_grid, score

__all__ = ["NAG_EMBEDDED", "QUALITY_METHODS", "QUALITY_PAIRS", "QUALITY_STEPS", "REGENERATE_QUALITY", "render_quality",
           "run_quality", "write_quality_markdown"]

REGENERATE_QUALITY = "nagkit bench --quality --markdown docs/quality.md --json docs/quality.json"
#: (prompt, negative) pairs: each prompt leaves the negated attribute open.
QUALITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("a circle", "red"),
    ("a square", "blue"),
    ("a shape", "circle"),
    ("a red shape", "triangle"),
    ("a large shape", "a white background"),
    ("a green shape", "large"),
)
QUALITY_STEPS: tuple[int, ...] = (1, 2, 4, 8, 25)
#: NAG at the ``embedded`` preset (scale 8, τ 5, α 1): the settings the toy model needs (see ``nagkit.PRESETS``).
NAG_EMBEDDED = Method("nag", 8.0, 5.0, 1.0)
#: Methods compared: no guidance; CFG at three scales; NAG with the Flux preset's ``tau``/``alpha`` (2.5, 0.25) at four
#: scales (preset scale 5) and in ``official`` mode; NAG at the ``embedded`` preset, ``fast`` and ``official``.
QUALITY_METHODS: tuple[Method, ...] = (
    Method("none"),
    Method("cfg", 2.0),
    Method("cfg", 4.0),
    Method("cfg", 7.0),
    Method("nag", 3.0),
    Method("nag", 5.0),
    Method("nag", 8.0),
    Method("nag", 12.0),
    Method("nag", 5.0, mode="official"),
    NAG_EMBEDDED,
    Method("nag", 8.0, 5.0, 1.0, mode="official"),
)
_GRID_METHODS = ("none", "CFG 4", NAG_EMBEDDED.label)
_GRID_STEPS = (1, 2, 4, 8)


def run_quality(
    pairs: Sequence[tuple[str, str]] = QUALITY_PAIRS,
    methods: Sequence[Method] = QUALITY_METHODS,
    steps: Sequence[int] = QUALITY_STEPS,
    seeds: int = 32,
    pipe: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the quality benchmark.

    Args:
        pairs: (prompt, negative) pairs.
        methods: Methods to compare (same seeds for all).
        steps: Step counts.
        seeds: Images per (pair, method, steps): seeds ``0 .. seeds-1``.
        pipe: The embedded pipeline (default: :func:`nagkit.toy.model.load_embedded_pipeline`).
        progress: Called with one line per (pair, method).

    Returns:
        The report: ``{"pairs": [{"prompt", "negative", "methods": {label: {steps: score}},
        "fast_vs_official": {...}}], "summary": {label: {steps: mean score}}, "machine", "seconds", ...}``; the images
        of the grid are under the private key ``"_grid"``.
    """
    from nagkit.toy.model import embedded_info, load_embedded_pipeline

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    started = time.perf_counter()
    pipe = load_embedded_pipeline() if pipe is None else pipe
    seed_list = list(range(seeds))
    out_pairs, grid = [], None
    for p, (prompt, negative) in enumerate(pairs):
        by_method: dict[str, dict[int, dict[str, float]]] = {}
        images: dict[tuple[str, int], list[Any]] = {}
        for method in methods:
            t0 = time.perf_counter()
            by_method[method.label] = {}
            for n in steps:
                ims = generate(pipe, prompt, negative, method, n, seed_list)
                images[(method.label, n)] = ims
                by_method[method.label][n] = score(ims, prompt, negative)
            if progress:
                rates = " ".join(f"{n}:{_cell(s)}" for n, s in by_method[method.label].items())
                progress(f'"{prompt}" − "{negative}" {method.label:<20} {rates}  ({time.perf_counter() - t0:.0f} s)')
        gap = {}
        for official in [m.label for m in methods if m.kind == "nag" and m.mode == "official"]:
            fast = official.replace("(official)", "(fast)")
            if fast in by_method:
                gap[official.removesuffix(" (official)")] = {
                    n: float(
                        np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                                 for a, b in zip(images[(fast, n)], images[(official, n)], strict=True)])
                    )
                    for n in steps
                }
        out_pairs.append({"prompt": prompt, "negative": negative, "methods": by_method, "fast_vs_official": gap})
        if p == 0 and all(m in by_method for m in _GRID_METHODS) and all(n in steps for n in _GRID_STEPS):
            grid = image_grid([[images[(m, n)] for n in _GRID_STEPS] for m in _GRID_METHODS], list(_GRID_METHODS),
                              [f"{n} step{'s' * (n > 1)}" for n in _GRID_STEPS])
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for method in methods:
        summary[method.label] = {
            n: {k: float(np.mean([pr["methods"][method.label][n][k] for pr in out_pairs]))
                for k in ("negative_rate", "fidelity", "off_palette", "confidence")}
            for n in steps
        }
    import torch

    report = {
        "seeds": seeds,
        "steps": list(steps),
        "methods": [m.label for m in methods],
        "pairs": out_pairs,
        "summary": summary,
        "model": {k: v for k, v in embedded_info().items() if k != "log"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "_grid": grid,
    }
    report["findings"] = findings(report)
    return report


def findings(report: dict[str, Any], nag: str | None = None, cfg: str = "CFG 4") -> list[str]:
    """Sentences computed from the numbers (no hand-written figures): NAG's preset vs no guidance and CFG per step
    count, where NAG does not win, and ``fast`` vs ``official``.

    Args:
        report: :func:`run_quality`'s report (``summary`` filled).
        nag: Label of the NAG method to describe (default: the ``embedded`` preset's, else the first NAG method).
        cfg: Label of the CFG method to compare with.

    Returns:
        Markdown bullet lines.
    """
    summary = report["summary"]
    if nag is None:
        nags = [label for label in summary if label.startswith("NAG")]
        nag = NAG_EMBEDDED.label if NAG_EMBEDDED.label in summary else (nags[0] if nags else "")
    if not {"none", nag, cfg} <= set(summary):
        return []
    out = []
    for n in report["steps"]:
        a, b, c = summary["none"][n], summary[nag][n], summary[cfg][n]
        out.append(
            f"* {n} step{'s' * (n > 1)}: negative rate {a['negative_rate']:.0%} (none) → {b['negative_rate']:.0%} "
            f"({nag}) vs {c['negative_rate']:.0%} ({cfg}); fidelity {a['fidelity']:.0%} → {b['fidelity']:.0%} vs "
            f"{c['fidelity']:.0%}; off-palette {a['off_palette']:.1%} → {b['off_palette']:.1%} vs "
            f"{c['off_palette']:.1%}."
        )
    cfg_better = [n for n in report["steps"] if summary[cfg][n]["negative_rate"] < summary[nag][n]["negative_rate"]]
    if cfg_better:
        out.append(f"* {cfg} removes the negative attribute more often than {nag} at "
                   f"{', '.join(map(str, cfg_better))} steps.")
    loses_fidelity = [n for n in report["steps"] if summary[nag][n]["fidelity"] < summary["none"][n]["fidelity"] - 0.05]
    if loses_fidelity:
        out.append(f"* {nag} lowers prompt fidelity by more than 5 points at {', '.join(map(str, loses_fidelity))} "
                   "steps.")
    flux = "NAG 5 (fast)"
    if flux in summary and flux != nag:
        rates = ", ".join(f"{summary[flux][n]['negative_rate']:.0%}" for n in report["steps"])
        out.append(f"* {flux} (the Flux preset) for comparison: negative rate {rates} "
                   f"(per step count {', '.join(map(str, report['steps']))}).")
    official = nag.replace("(fast)", "(official)")
    if official in summary:
        d = [summary[official][n]["negative_rate"] - summary[nag][n]["negative_rate"] for n in report["steps"]]
        f = [summary[official][n]["fidelity"] - summary[nag][n]["fidelity"] for n in report["steps"]]
        dn = ", ".join(f"{x * 100:+.0f}" for x in d)
        df = ", ".join(f"{x * 100:+.0f}" for x in f)
        out.append(f"* `official` − `fast` mode, {nag.removesuffix(' (fast)')}: negative rate {dn} points, "
                   f"fidelity {df} points (per step count {', '.join(map(str, report['steps']))}).")
    return out


def _cell(s: dict[str, float]) -> str:
    return f"{s['negative_rate']:.0%} / {s['fidelity']:.0%}"


def render_quality(report: dict[str, Any]) -> str:
    """Terminal table: mean over pairs, negative rate / fidelity per method and step count.

    Args:
        report: :func:`run_quality`'s report.

    Returns:
        The table.
    """
    steps = report["steps"]
    lines = [f"mean over {len(report['pairs'])} (prompt, negative) pairs × {report['seeds']} seeds; "
             "cell = negative-attribute rate / prompt fidelity",
             f"{'method':<22}" + "".join(f"{f'{n} steps':>14}" for n in steps)]
    for label, row in report["summary"].items():
        lines.append(f"{label:<22}" + "".join(f"{_cell(row[n]):>14}" for n in steps))
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
    """The embedded model's training record (shipped next to its weights) as Markdown."""
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


def _curriculum_note(record: dict[str, Any]) -> str:
    """The curriculum of the training record (the first diffusion steps on one-shape, fully captioned scenes)."""
    n = record.get("simple_steps", 0)
    return f", the first {n} steps on one-shape scenes with fully specified captions" if n else ""


def _autoencoder_note(record: dict[str, Any]) -> str:
    """The autoencoder stage of the training record (trained first; its minutes are part of the wall time)."""
    ae = record.get("autoencoder")
    if not ae:
        return ""
    return (f" The autoencoder was trained first: {ae['steps']} steps (lr {ae['lr']:g}, KL weight "
            f"{ae['kl_weight']:g}), {ae['minutes']:.1f} min, final reconstruction MSE {ae['final_mse']:.4f}; "
            f"the transformer then trained on its standardised latents (scale {ae['scaling_factor']:.3f}, shift "
            f"{ae['shift_factor']:.3f}).")


def _pace_note(record: dict[str, Any]) -> str:
    """The training record's median pace, and whether the wall time shows contention (other jobs on the CPU)."""
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


def write_quality_markdown(report: dict[str, Any], path: str | Path) -> tuple[Path, Path | None]:
    """Write ``docs/quality.md`` (and the grid PNG next to it, ``<stem>_grid.png``).

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
    steps = report["steps"]
    model = report.get("model", {})
    first = report["pairs"][0]
    lines = [
        "# Quality: what negative guidance does on the embedded model",
        "",
        "<!-- Generated by `nagkit bench --quality`; edit src/nagkit/bench/quality.py instead of this file. -->",
        "",
        f"Regenerate with `{REGENERATE_QUALITY}` ({report['seconds'] / 60:.0f} min on "
        f"{report['machine']['threads']} CPU threads, {report['machine']['cpu']}).",
        "",
        "The embedded model is a FLUX-architecture pipeline trained by nagkit on procedural scenes (see the README's "
        f"*Embedded model* section; {model.get('steps', '?')} steps, final loss {model.get('final_loss', 0):.4f}). "
        "Every method generates the same seeds; the judge (`nagkit.toy.judge`, rules on pixels) reads each image. "
        f"{report['seeds']} seeds per cell.",
        "",
        "* **negative rate**: fraction of images that still show the negative attribute (lower is better);",
        "* **fidelity**: fraction that satisfy everything the prompt says (higher is better);",
        "* **off-palette**: mean fraction of pixels far from every palette colour (smears, artifacts; lower is "
        "better);",
        "* **confidence**: mean judge confidence (malformed shapes or ambiguous colours score low).",
        "",
        "CFG is true classifier-free guidance with the negative as `negative_prompt` (`true_cfg_scale`, two passes); "
        "NAG uses the negative as NAG negative, no CFG: rows `NAG s` use the Flux preset's `tau` 2.5 and `alpha` "
        "0.25 (preset scale 5); `NAG 8 τ5 α1` is the `embedded` preset, the setting this 6-block model needs.",
        "",
    ]
    if grid_path is not None:
        lines += [f'## Grid: "{first["prompt"]}", negative "{first["negative"]}"', "",
                  f"Rows: {', '.join(_GRID_METHODS)}; columns: 1, 2, 4, 8 steps; the first four seeds of each "
                  "cell.", "", f"![grid]({grid_path.name})", ""]
    lines += ["## Summary (mean over pairs)", "", "Cell: negative rate / fidelity.", ""]
    lines += _md_table(["method", *(f"{n} steps" for n in steps)],
                       [[label, *(_cell(row[n]) for n in steps)] for label, row in report["summary"].items()])
    lines += ["", "Artifacts: off-palette % / judge confidence.", ""]
    lines += _md_table(["method", *(f"{n} steps" for n in steps)],
                       [[label, *(f"{row[n]['off_palette']:.1%} / {row[n]['confidence']:.2f}" for n in steps)]
                        for label, row in report["summary"].items()])
    lines += ["", "## Per pair", ""]
    for pr in report["pairs"]:
        lines += [f'### "{pr["prompt"]}", negative "{pr["negative"]}"', "", "Cell: negative rate / fidelity.", ""]
        lines += _md_table(["method", *(f"{n} steps" for n in steps)],
                           [[label, *(_cell(row[n]) for n in steps)] for label, row in pr["methods"].items()])
        lines.append("")
    gaps = [(pr["prompt"], pr["negative"], scale, g) for pr in report["pairs"]
            for scale, g in pr["fast_vs_official"].items()]
    if gaps:
        lines += ["## `fast` vs `official` mode (same seeds)", "",
                  "Mean absolute pixel difference between the two modes' images (fraction of full range).", ""]
        lines += _md_table(["pair", "NAG", *(f"{n} steps" for n in steps)],
                           [[f'"{p}" − "{n_}"', s, *(f"{g[n]:.3f}" for n in steps)] for p, n_, s, g in gaps])
        lines.append("")
    if report.get("findings"):
        lines += ["## Findings", "", *report["findings"], ""]
    lines += _training_section()
    path.write_text("\n".join(lines))
    return path, grid_path
