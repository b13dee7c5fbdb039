"""Reports of ``nagkit bench``: terminal table (rich when installed), JSON, Markdown page and bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REGENERATE = "nagkit bench --markdown docs/benchmarks.md"
COLUMNS = ("family", "params", "image tok", "text tok", "base TFLOPs", "cfg", "nag", "nag+cfg", "official", "min",
           "nag − min")
SHORT_NOTES = {"nag": "not supported yet", "nag+cfg": "not supported yet", "official": "n/a", "min": "n/a"}


def _percent(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 100:+.1f}%" if abs(value) >= 0.1 else f"{value * 100:+.2f}%"


def _gap(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0 (exact)"
    return f"{value * 100:+.4f} pp"


def _tokens(family: dict[str, Any]) -> tuple[str, str]:
    g = family["geometry"]
    image = f"{g['image_tokens']:,}"
    if g["image_context_tokens"]:
        image += f" (+{g['image_context_tokens']} ctx)"
    text = f"{g['text_tokens']}"
    if g["negative_tokens"] != g["text_tokens"]:
        text += f" / neg {g['negative_tokens']}"
    return image, text


def _geometry(family: dict[str, Any]) -> str:
    g = family["geometry"]
    size = f"{g['width']}×{g['height']}"
    if g["frames"]:
        size += f"×{g['frames']}f"
    if g["batch"] != 1:
        size += f", B={g['batch']}"
    return size


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row of strings per family, in :data:`COLUMNS` order.

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.

    Returns:
        The rows.
    """
    rows = []
    for fam in report["families"]:
        variants = fam["variants"]
        image, text = _tokens(fam)
        cells = [f"{fam['title']} ({_geometry(fam)})", f"{fam['params'] / 1e9:.2f}B", image, text,
                 f"{fam['base_tflops']:.2f}"]
        for name in ("cfg", "nag", "nag+cfg", "official", "min"):
            value = variants[name]["overhead"]
            if value is not None:
                cells.append(_percent(value))
            else:
                cells.append("failed" if variants[name]["note"].startswith("NAG failed") else SHORT_NOTES[name])
        cells.append(_gap(fam["nag_minus_min"]))
        rows.append(cells)
    return rows


def render_terminal(report: dict[str, Any]) -> str:
    """The FLOP table as text for a terminal (a rich table when ``rich`` is installed, else plain columns).

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.

    Returns:
        The rendered table (with a title line and the runtime).
    """
    rows = table_rows(report)
    title = "FLOP overhead of negative guidance over one conditional pass (exact counts, meta device)"
    footer = f"counted in {report['seconds']:.1f} s"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join([*lines, footer])
    table = Table(title=title, caption=footer)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=200, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get().rstrip()


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON.

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.
        path: output file (parent folders are created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def chart_path(markdown: str | Path) -> Path:
    """Where the bar chart of a Markdown report goes.

    Args:
        markdown: the Markdown page, e.g. ``docs/benchmarks.md``.

    Returns:
        The PNG next to it, e.g. ``docs/benchmarks_flops.png``.
    """
    markdown = Path(markdown)
    return markdown.with_name(f"{markdown.stem}_flops.png")


def write_chart(report: dict[str, Any], path: str | Path) -> Path | None:
    """Bar chart of the overheads (log scale), one group of bars per family; needs matplotlib.

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.
        path: output PNG.

    Returns:
        The path written, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None
    families = report["families"]
    series = [("cfg", "CFG", "#9e9e9e"), ("nag", "nagkit NAG", "#1f77b4"),
              ("official", "official-style NAG", "#ff7f0e"), ("min", "analytic minimum", "#2ca02c")]
    fig, ax = plt.subplots(figsize=(10, 0.75 * len(families) + 1.8), dpi=120)
    height = 0.8 / len(series)
    for j, (key, label, color) in enumerate(series):
        ys, xs = [], []
        for i, fam in enumerate(families):
            value = fam["variants"][key]["overhead"]
            if value is not None and value > 0:
                ys.append(i + (j - (len(series) - 1) / 2) * height)
                xs.append(value * 100)
        bars = ax.barh(ys, xs, height=height, color=color, label=label)
        if key == "nag":
            ax.bar_label(bars, labels=[f"{x:.2f}%" for x in xs], padding=2, fontsize=7)
    ax.set_yticks(range(len(families)), [f["title"] for f in families])
    ax.invert_yaxis()
    ax.set_xscale("log")
    smallest = min((b.get_width() for b in ax.patches if b.get_width() > 0), default=1.0)
    ax.set_xlim(left=10 ** math.floor(math.log10(smallest)), right=200)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}%"))
    ax.set_xlabel("extra FLOPs over one conditional forward (log scale)")
    fig.suptitle("Compute overhead of negative guidance (exact FLOP counts, full-size configs)")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render_markdown(report: dict[str, Any], chart: str | None) -> str:
    """The benchmarks page (Markdown): how to regenerate it, the FLOP table, the chart, the method, the TODOs.

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.
        chart: file name of the chart relative to the page, or None to leave it out.

    Returns:
        The page text.
    """
    versions = report["versions"]
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    rows = ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    notes = [f"* **{fam['title']}**: {note}" for fam in report["families"] for note in fam["notes"]]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `nagkit bench`; edit src/nagkit/bench/report.py instead of this file. -->",
        "",
        "Regenerate this page and its chart with one command (CPU only, about two minutes on two cores; no GPU, no "
        "weights, nothing downloaded):",
        "",
        "```bash",
        REGENERATE + "          # also writes docs/benchmarks_flops.png (pip install 'nagkit[bench]')",
        "```",
        "",
        "## FLOP overhead of negative guidance",
        "",
        "Extra compute of one denoising step, relative to one conditional forward (`none`), counted exactly on the "
        "full-size published configs (bf16, batch 1 unless noted; the negative has as many tokens as the prompt).",
        "",
        header,
        rule,
        *rows,
        "",
    ]
    if chart:
        lines += [f"![FLOP overhead per family (log scale)]({chart})", ""]
    lines += [
        "Columns:",
        "",
        "* **base TFLOPs**: one conditional forward of the denoiser (`none`).",
        "* **cfg**: classifier-free guidance, one forward of twice the batch (conditional + unconditional).",
        "* **nag**: nagkit, `nagkit.apply(model, negative={...})`, one forward of the prompt batch.",
        "* **nag+cfg**: NAG on the conditional branch of CFG, counted as two forwards (unconditional plain + "
        "conditional guided). nagkit's batched `[uncond, cond]` call also projects the keys/values of the zero "
        "negative tokens on the unconditional rows, which this column leaves out.",
        "* **official**: the official implementation's computation, counted on an in-repo reference "
        "(`nagkit.bench.reference`): the prompt and the negative are concatenated along the batch and each text "
        "cross-attention tiles the image queries, i.e. one more attention of every image token over the negative, "
        "plus the negative's key/value projections. Not available for joint-attention (MM-DiT) families yet: "
        "their official processors compute more (e.g. FLUX runs the single blocks again for the negative), which "
        "needs a joint-attention reference (TODO). The **nag** column of those families is nagkit's default "
        "`mode=\"fast\"`.",
        "* **min**: the analytic minimum of any NAG implementation. Cross-attention: the negative's per-token text "
        "layers (caption projection / text embedder), its key/value projections and the image-query × negative-key "
        "attention in every text cross-attention. Joint attention: the negative text as its own stream through every "
        "text layer, its queries over `[negative, image]` keys, and the image queries over the negative's keys.",
        "* **nag − min**: nagkit's distance to the minimum, in percentage points of `none`.",
        "",
        "## Method",
        "",
        "* Each denoiser is built with its class's `__init__` from the config in `src/nagkit/bench/configs/` under "
        "`torch.device(\"meta\")`, cast to bf16: no weights, no memory. Inputs are meta tensors of the shapes a "
        "pipeline passes (latents from resolution, frames and the VAE factors; timesteps; text embeddings; SDXL "
        "`added_cond_kwargs`; PixArt/Sana text masks; Wan I2V CLIP image tokens; Flux ids and guidance).",
        "* FLOPs come from `torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention, a "
        "multiply-add counting 2. Elementwise work (norms, softmax, RoPE, the NAG combination itself) is not counted; "
        "it is O(L·C), small next to O(L·C²), but not free in wall time.",
        "* Attention is counted exactly once: on meta, `F.scaled_dot_product_attention` decomposes into two `bmm`; "
        "the CPU flash kernel (which nagkit's log-sum-exp attention calls) gets a registered formula "
        "`4·B·H·Lq·Lk·D`; every run first checks one attention call on both paths against that formula.",
        _min_check_sentence(report),
        "* FLOPs say nothing about kernel efficiency (several small attention calls vs one fused call, memory "
        "traffic of the merge): that is what time mode is for.",
        "",
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += [
        "## TODO: time mode",
        "",
        "Time mode (wall-clock time per denoising step on CPU/GPU, `nagkit bench --mode time`) is **not implemented "
        "yet**. FLOP counts above are exact but do not measure kernel efficiency or memory traffic.",
        "",
        "---",
        f"nagkit {versions['nagkit']}, diffusers {versions['diffusers']}, torch {versions['torch']}.",
        "",
    ]
    return "\n".join(lines)


def _min_check_sentence(report: dict[str, Any]) -> str:
    checked = [f for f in report["families"] if f["min_check_flops"] is not None and f["variants"]["min"]["flops"]]
    exact = [f for f in checked
             if f["variants"]["min"]["flops"] - f["variants"]["none"]["flops"] == f["min_check_flops"]]
    text = ("* For cross-attention families the analytic minimum is also checked against one forward with the "
            "negative's tokens appended to the prompt's (the same extra work): ")
    if len(exact) == len(checked):
        return text + "the two agree exactly for every family."
    names = ", ".join(f["title"] for f in checked if f not in exact)
    return text + f"they differ for {names} (see the notes)."


def write_markdown(report: dict[str, Any], path: str | Path) -> tuple[Path, Path | None]:
    """Write the Markdown page and, when matplotlib is installed, its bar chart next to it.

    Args:
        report: the dict returned by :func:`nagkit.bench.run_flops`.
        path: the Markdown file, e.g. ``docs/benchmarks.md`` (chart: ``docs/benchmarks_flops.png``).

    Returns:
        ``(markdown path, chart path or None)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chart = write_chart(report, chart_path(path))
    path.write_text(render_markdown(report, chart.name if chart else None), encoding="utf-8")
    return path, chart
