"""``nagkit bench``: the cost of negative guidance (exact FLOPs, wall time) and the embedded model's quality."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import CLIError, quiet_libraries


def cmd_quality(args: argparse.Namespace) -> int:
    """``nagkit bench --quality``: negative-attribute rate, fidelity and artifacts on the embedded model."""
    from ..bench.quality import render_quality, run_quality, write_json, write_quality_markdown

    if args.seeds < 1:
        raise CLIError("--seeds must be >= 1")
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = run_quality(seeds=args.seeds, progress=progress)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    print(render_quality(report))
    if args.json:
        print(write_json(report, args.json))
    if args.markdown:
        page, grid = write_quality_markdown(report, args.markdown)
        print(page)
        if grid is not None:
            print(grid)
    return 0


def _bench_specs(args: argparse.Namespace) -> list[Any]:
    """The families ``nagkit bench`` runs, with the command line's geometry; FLOP mode: specs, time mode:
    ``(reduced spec, reductions)`` pairs. Raises :class:`CLIError` on unknown families or invalid geometry."""
    from ..bench import load_families, reduce_for_time

    families = load_families()
    names = args.family or list(families)
    unknown = [n for n in names if n not in families]
    if unknown:
        raise CLIError(f"unknown family {', '.join(unknown)}; choose from {', '.join(families)}")
    if args.negative_length is not None and args.negative_length < 1:
        raise CLIError("--negative-length must be >= 1")
    geometry = {"height": args.height, "width": args.width, "frames": args.frames,
                "negative_tokens": args.negative_length, "batch": args.batch if args.batch != 1 else None}
    specs: list[Any] = []
    for name in names:
        try:
            if args.mode == "time":
                specs.append(reduce_for_time(families[name], **geometry))
            else:
                spec = families[name].with_geometry(**{**geometry, "batch": args.batch})
                spec.geometry.validate()
                specs.append(spec)
        except ValueError as err:
            raise CLIError(f"{name}: {err}") from None
    return specs


def cmd_bench(args: argparse.Namespace) -> int:
    """``nagkit bench``: the cost of negative guidance. ``--mode flops`` (default): exact FLOP overhead on
    full-size configs (meta device, no weights); ``--mode time``: wall time and peak memory per denoiser call on
    reduced configs with random weights (CPU; ``--device cuda`` is untested).

    Args:
        args: parsed ``bench`` arguments.

    Returns:
        The exit status (0).
    """
    quiet_libraries()
    if args.quality:
        return cmd_quality(args)
    from ..bench import run_flops, run_time
    from ..bench.report import render_terminal, write_json, write_markdown

    specs = _bench_specs(args)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.mode == "time":
        import torch

        if args.repeats < 1 or args.warmup < 0:
            raise CLIError("--repeats must be >= 1 and --warmup >= 0")
        device = args.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CLIError("--device cuda: CUDA is not available")
        if not (device == "cpu" or device.startswith("cuda")):
            raise CLIError("--device must be cpu or cuda[:N]")
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        if args.threads is not None and args.threads < 1:
            raise CLIError("--threads must be >= 1")
        report = run_time(specs, device=device, dtype=getattr(torch, dtype), repeats=args.repeats,
                          warmup=args.warmup, seed=args.seed, progress=progress, threads=args.threads)
    else:
        if args.short_negative < 0:
            raise CLIError("--short-negative must be >= 0")
        report = run_flops(specs, progress, short_negative=args.short_negative)
    print(render_terminal(report))
    if args.json:
        print(write_json(report, args.json))
    if args.markdown:
        page, chart = write_markdown(report, args.markdown)
        print(page)
        if chart is not None:
            print(chart)
        elif args.mode == "flops":
            print("matplotlib is not installed: the page has no chart (pip install 'nagkit[bench]')", file=sys.stderr)
    return 0
