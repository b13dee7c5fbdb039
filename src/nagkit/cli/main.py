"""``nagkit`` command line: ``nagkit demo``, ``nagkit generate``, ``nagkit info`` and ``nagkit bench``.

Examples::

    nagkit demo                                                             # offline, embedded model, < 2 min
    nagkit generate "a circle" --negative "red"                             # the embedded model
    nagkit generate black-forest-labs/FLUX.1-schnell "a corgi" --negative "blurry" --steps 4
    nagkit generate tiny-sdxl "a red cat" --negative "blurry" --out out/cat.png      # offline, built-in tiny model
    nagkit info Wan-AI/Wan2.1-T2V-1.3B-Diffusers
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ loading
EMBEDDED = "embedded"  # the model name of the embedded toy pipeline (the default of `nagkit generate`)


def _is_tiny(model: str) -> bool:
    from ..adapters.base import TINY_MODELS  # filled by the family modules (``Adapter.tiny``)

    return model in TINY_MODELS


def _load_builtin(model: str) -> Any:
    if model == EMBEDDED:
        from ..toy.model import load_embedded_pipeline

        try:
            return load_embedded_pipeline()
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    from ..adapters.base import TINY_MODELS

    return TINY_MODELS[model].builder(seed=0)


def load_pipeline(model: str, dtype: str, device: str, offload: bool) -> Any:
    """Load a diffusers pipeline by hub id, local path, or built-in tiny name; raise :class:`CLIError` on failure."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if _is_tiny(model) or model == EMBEDDED:
        pipe = _load_builtin(model)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
        except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CLIError(f"cannot load {model!r}: {reason} (check the hub id or local path; offline machines need "
                           "the model in the local Hugging Face cache or a local folder)") from None
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _model_index(model: str) -> dict[str, Any]:
    if _is_tiny(model) or model == EMBEDDED:
        pipe = _load_builtin(model)
        index = {"_class_name": type(pipe).__name__}
        index.update({k: ["diffusers", type(v).__name__] for k, v in pipe.components.items() if v is not None})
        return index
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(model))
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"cannot read the pipeline config of {model!r}: {reason}") from None


# ------------------------------------------------------------------------------------------------ info
def support_report(model: str) -> dict[str, Any]:
    """Whether and how NAG supports ``model`` (reads only ``model_index.json``, no weights)."""
    from ..adapters import base as adapters
    from ..integration.pipelines import PIPELINES

    index = _model_index(model)
    pipeline = index.get("_class_name", "?")
    spec = PIPELINES.get(pipeline)
    denoisers = {}
    for name in ("unet", "transformer", "transformer_2"):
        entry = index.get(name)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            denoisers[name] = entry[1]
    families = {}
    for name, klass in denoisers.items():
        adapter = next((a for a in adapters._REGISTRY if a.model_class.__name__ == klass), None)
        families[name] = adapter
    supported = spec is not None and bool(families) and all(a is not None for a in families.values())
    report: dict[str, Any] = {"model": model, "pipeline": pipeline, "supported": supported,
                              "denoisers": {n: klass for n, klass in denoisers.items()}}
    if supported:
        from ..core.config import get_preset

        first = next(iter(families.values()))
        report["family"] = first.family
        report["how"] = first.notes
        report["preset"] = {"name": spec.preset, **get_preset(spec.preset).to_dict()}
    else:
        from ..adapters import supported_models

        report["reason"] = (f"{pipeline} is not a supported pipeline" if spec is None else
                            "its denoiser is not supported")
        report["supported_pipelines"] = sorted(PIPELINES)
        report["supported_denoisers"] = supported_models()
    return report


def cmd_info(args: argparse.Namespace) -> int:
    report = support_report(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["supported"] else 1
    if report["supported"]:
        p = report["preset"]
        print(f"{args.model}: supported ({report['pipeline']}, family '{report['family']}')")
        print(f"  how: {report['how']}")
        print(f"  default preset '{p['name']}': scale={p['scale']} tau={p['tau']} alpha={p['alpha']} "
              f"start={p['start']} end={p['end']}")
        return 0
    print(f"{args.model}: not supported: {report['reason']} ({report['pipeline']}, denoisers: "
          f"{report['denoisers'] or 'none'})")
    print(f"  supported pipelines: {', '.join(report['supported_pipelines'])}")
    return 1


# ------------------------------------------------------------------------------------------------ generate
def _accepts(pipe: Any, name: str) -> bool:
    return name in inspect.signature(type(pipe).__call__).parameters


def _call_kwargs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {"prompt": args.prompt, "num_inference_steps": args.steps}
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.cfg_negative is not None:
        if not _accepts(pipe, "negative_prompt"):
            raise CLIError(f"{type(pipe).__name__} takes no CFG negative prompt")
        kwargs["negative_prompt"] = args.cfg_negative
    for flag, names in (("height", ("height",)), ("width", ("width",)), ("frames", ("num_frames",))):
        value = getattr(args, flag)
        if value is None:
            continue
        name = next((n for n in names if _accepts(pipe, n)), None)
        if name is None:
            raise CLIError(f"--{flag} is not an option of {type(pipe).__name__}")
        kwargs[name] = value
    if args.batch > 1:
        name = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if _accepts(pipe, n)), None)
        if name is None:
            raise CLIError(f"--batch is not an option of {type(pipe).__name__}")
        kwargs[name] = args.batch
    if args.image is not None:
        from PIL import Image

        try:
            kwargs["image"] = Image.open(args.image).convert("RGB")
        except OSError as err:
            raise CLIError(f"cannot read --image {args.image}: {err}") from None
    generator_device = "cpu" if args.offload else args.device
    kwargs["generator"] = torch.Generator(device=generator_device).manual_seed(args.seed)
    if args.model == EMBEDDED:
        from ..toy.model import EMBEDDED_CALL_KWARGS

        for key, value in EMBEDDED_CALL_KWARGS.items():
            kwargs.setdefault(key, value)
    if _is_tiny(args.model):
        from ..adapters.base import TINY_MODELS

        for key, value in TINY_MODELS[args.model].call_kwargs.items():
            kwargs.setdefault(key, value)
        if args.model == "tiny-wan-i2v" and "image" not in kwargs:
            from ..tiny.pipelines import tiny_condition_image

            kwargs["image"] = tiny_condition_image()
    return kwargs


def _output_paths(out: str, count: int, ext: str) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ext:
        path = path.with_suffix(ext) if path.suffix else path / f"nagkit{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def _save(result: Any, args: argparse.Namespace) -> list[Path]:
    frames = getattr(result, "frames", None)
    if frames is not None:
        try:
            import imageio.v2 as imageio
            import numpy as np
        except ImportError:
            raise CLIError("writing MP4 needs the video extra: pip install 'nagkit[video]'") from None
        paths = _output_paths(args.out, len(frames), ".mp4")
        for path, video in zip(paths, frames, strict=True):
            array = np.asarray(video)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            try:
                imageio.mimsave(path, list(array), fps=args.fps, macro_block_size=1)
            except Exception as err:  # noqa: BLE001 - missing ffmpeg backend
                raise CLIError(f"cannot write {path}: {err} (pip install 'nagkit[video]')") from None
        return paths
    images = result.images
    paths = _output_paths(args.out, len(images), ".png")
    for path, image in zip(paths, images, strict=True):
        image.save(path)
    return paths


def _split_model_prompt(args: argparse.Namespace) -> None:
    """``nagkit generate [MODEL] PROMPT``: one positional is the prompt for the embedded model."""
    if len(args.words) == 1:
        args.model, args.prompt = EMBEDDED, args.words[0]
    elif len(args.words) == 2:
        args.model, args.prompt = args.words
    else:
        raise CLIError(f"expected [MODEL] PROMPT, got {len(args.words)} positional arguments (quote the prompt)")


def cmd_generate(args: argparse.Namespace) -> int:
    import diffusers
    import torch

    from .. import __version__, apply, toy  # noqa: F401  (nagkit.toy registers the "embedded" preset)

    _split_model_prompt(args)
    if args.steps is None:
        args.steps = 8 if args.model == EMBEDDED else 4
    if args.model == EMBEDDED and args.preset is None:
        args.preset = "embedded"

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr)
    pipe = load_pipeline(args.model, args.dtype, args.device, args.offload)
    try:
        guide = apply(pipe, negative_prompt=args.negative, scale=args.nag_scale, tau=args.nag_tau,
                      alpha=args.nag_alpha, start=args.start, end=args.end, preset=args.preset, mode=args.mode,
                      norm=args.nag_norm)
    except (TypeError, ValueError, KeyError, NotImplementedError) as err:
        raise CLIError(str(err).strip("'\"")) from None
    kwargs = _call_kwargs(pipe, args)
    print(f"NAG: {guide.config}", file=sys.stderr)
    result = pipe(**kwargs)
    paths = _save(result, args)
    settings = {
        "model": args.model, "pipeline": type(pipe).__name__, "prompt": args.prompt, "negative": args.negative,
        "cfg_negative": args.cfg_negative, "nag": guide.config.to_dict(), "preset": args.preset,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "height": args.height, "width": args.width,
        "frames": args.frames, "batch": args.batch, "device": args.device, "dtype": args.dtype,
        "offload": args.offload, "image": args.image, "files": [str(p) for p in paths],
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {"nagkit": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
                     "transformers": version("transformers")},
    }
    sidecar = paths[0].with_name(paths[0].stem.removesuffix("_0") + ".json")
    sidecar.write_text(json.dumps(settings, indent=2))
    guide.remove()
    for path in paths:
        print(path)
    print(sidecar)
    return 0


# ------------------------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    """``nagkit demo``: the embedded model, no guidance / CFG / NAG at 1, 2, 4, 8 steps, one PNG grid + numbers."""
    import json as json_

    from ..toy.demo import demo_methods, format_demo, run_demo
    from ..toy.evaluate import parse_negative

    if args.seeds < 1:
        raise CLIError("--seeds must be >= 1")
    try:
        parse_negative(args.negative)
        from ..toy.data import parse_caption

        parse_caption(args.prompt)
    except ValueError as err:
        raise CLIError(f"{err} (the embedded model knows the toy grammar: see `nagkit demo --help`)") from None
    try:
        demo_methods(args.cfg_scale, args.nag_scale, args.nag_tau, args.nag_alpha)
    except ValueError as err:
        raise CLIError(str(err)) from None
    print("loading the embedded model ...", file=sys.stderr)
    try:
        result = run_demo(args.out, args.prompt, args.negative, seeds=args.seeds, cfg_scale=args.cfg_scale,
                          nag_scale=args.nag_scale, nag_tau=args.nag_tau, nag_alpha=args.nag_alpha)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    print(format_demo(result))
    if args.json:
        Path(args.json).write_text(json_.dumps(result, indent=1))
        print(args.json)
    return 0


# ------------------------------------------------------------------------------------------------ bench
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


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nagkit", description="Normalized Attention Guidance for diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="offline demo on the embedded model: no guidance / CFG / NAG at 1, 2, 4, 8 steps (PNG grid)",
        description="Generate with the embedded toy model (FLUX architecture, 32x32, trained by nagkit) for one "
                    "prompt and negative: rows no guidance, CFG with the negative, NAG; columns 1, 2, 4, 8 steps. "
                    "Prompts follow the toy grammar: [a|an] [small|large] [COLOUR] (circle|square|triangle|shape) "
                    "[at the POSITION] [and ...] [on a COLOUR background], or 'two shapes'. Colours: red green blue "
                    "yellow purple orange white black. Negatives name colours, kinds, sizes, positions or "
                    "'COLOUR background'.")
    demo.add_argument("--prompt", default=None, help="prompt (default: 'a circle')")
    demo.add_argument("--negative", default=None, help="negative prompt (default: 'red')")
    demo.add_argument("--seeds", type=int, default=16, help="images per cell (the grid shows 4; default 16)")
    demo.add_argument("--cfg-scale", type=float, default=None, help="CFG row's true_cfg_scale (default 4)")
    demo.add_argument("--nag-scale", type=float, default=None,
                      help="NAG row's scale (default 8, the 'embedded' preset)")
    demo.add_argument("--nag-tau", type=float, default=None, help="NAG row's tau (default 5, the 'embedded' preset)")
    demo.add_argument("--nag-alpha", type=float, default=None,
                      help="NAG row's alpha (default 1, the 'embedded' preset)")
    demo.add_argument("--out", default="nagkit_demo.png", help="grid PNG path (default: nagkit_demo.png)")
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with NAG; writes PNG/MP4 plus a JSON sidecar")
    gen.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                     help="optional model (hub id, local path, 'embedded' or a built-in tiny model: tiny-sdxl, "
                          "tiny-flux, ...; default: the embedded model), then the prompt")
    gen.add_argument("--negative", default=None, help="NAG negative prompt (default: the CFG negative, else '')")
    gen.add_argument("--cfg-negative", default=None, help="the pipeline's own CFG negative_prompt")
    gen.add_argument("--nag-scale", type=float, default=None, help="nag_scale = paper phi + 1 (<= 1 is off)")
    gen.add_argument("--nag-tau", type=float, default=None, help="norm cap tau > 0")
    gen.add_argument("--nag-alpha", type=float, default=None, help="blend alpha in [0, 1]")
    gen.add_argument("--preset", default=None,
                     help="preset name (default: the model family's; the embedded model: 'embedded')")
    gen.add_argument("--mode", default=None, choices=("fast", "official"),
                     help="fast (default): one image stream; official: the official code's outputs (Flux differs)")
    gen.add_argument("--nag-norm", default=None, choices=("l1", "l2"), help="norm of the cap (default by mode)")
    gen.add_argument("--start", type=float, default=None, help="schedule position where NAG starts (0..1)")
    gen.add_argument("--end", type=float, default=None, help="schedule position where NAG ends (0..1, = nag_end)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default 4; embedded model: 8)")
    gen.add_argument("--guidance", type=float, default=None, help="the pipeline's guidance_scale (CFG)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--frames", type=int, default=None, help="video frames")
    gen.add_argument("--fps", type=int, default=16, help="MP4 frame rate")
    gen.add_argument("--image", default=None, help="conditioning image (image-to-video)")
    gen.add_argument("--batch", type=int, default=1, help="images/videos per prompt")
    gen.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda if available)")
    gen.add_argument("--dtype", default="float32", choices=DTYPES)
    gen.add_argument("--offload", action="store_true", help="enable_model_cpu_offload()")
    gen.add_argument("--out", default="nagkit_out", help="output file or folder (default: nagkit_out/)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="does NAG support this model, and how")
    info.add_argument("model", help="hub id, local path, or a built-in tiny model")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="cost of NAG/CFG: exact FLOPs on full-size models (no weights) or wall "
                                          "time on reduced models")
    bench.add_argument("--quality", action="store_true",
                       help="quality benchmark on the embedded model instead of cost: negative-attribute rate, "
                            "prompt fidelity, artifacts for none / CFG / NAG (fast and official) at 1-25 steps "
                            "(about 15 min on 2 cores); --markdown docs/quality.md")
    bench.add_argument("--seeds", type=int, default=32, help="quality: seeds per (pair, method, steps)")
    bench.add_argument("--mode", default="flops", choices=("flops", "time"),
                       help="flops: exact counts on the meta device (default); time: wall time and peak memory per "
                            "denoiser call on reduced configs with random weights (about 5 min on 2 CPU cores)")
    bench.add_argument("--family", action="append", default=None,
                       help="family to benchmark (repeatable; default: all): sd15, sdxl, wan21-t2v-14b, "
                            "wan21-i2v-14b, pixart-sigma, sana-1.6b, sd35-large, flux1-dev, chroma1-hd")
    bench.add_argument("--height", type=int, default=None,
                       help="image height (default: the family's; time mode: the reduced config's)")
    bench.add_argument("--width", type=int, default=None, help="image width (default as --height)")
    bench.add_argument("--frames", type=int, default=None, help="video frames (video families only)")
    bench.add_argument("--negative-length", type=int, default=None,
                       help="negative text tokens (default: as many as the prompt)")
    bench.add_argument("--batch", type=int, default=1, help="prompts per call (CFG doubles it)")
    bench.add_argument("--short-negative", type=int, default=8, metavar="TOKENS",
                       help="flops mode: on families whose padded negatives nagkit shortens (PixArt, Sana) also "
                            "count NAG with a negative of this many valid tokens (default 8; 0: skip)")
    bench.add_argument("--repeats", type=int, default=4, help="time mode: timed rounds, the median is reported")
    bench.add_argument("--warmup", type=int, default=1, help="time mode: untimed rounds first")
    bench.add_argument("--device", default="cpu", help="time mode: cpu (default) or cuda (untested)")
    bench.add_argument("--dtype", default=None, choices=DTYPES,
                       help="time mode: default float32 on cpu (bf16 matmuls are slow on most CPUs), bfloat16 on cuda")
    bench.add_argument("--seed", type=int, default=0, help="time mode: seed of the random weights and inputs")
    bench.add_argument("--threads", type=int, default=None,
                       help="time mode: torch threads (default: torch's, one per core); 1 keeps the ratios stable on "
                            "a machine busy with other work")
    bench.add_argument("--json", default=None, metavar="PATH", help="write the full results as JSON")
    bench.add_argument("--markdown", default=None, metavar="PATH",
                       help="write this mode's section of a Markdown page (FLOP mode also PATH_STEM_flops.png), "
                            "e.g. docs/benchmarks.md")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nagkit`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ..toy.demo import DEMO_CFG_SCALE, DEMO_NEGATIVE, DEMO_PROMPT

        args.prompt = DEMO_PROMPT if args.prompt is None else args.prompt
        args.negative = DEMO_NEGATIVE if args.negative is None else args.negative
        args.cfg_scale = DEMO_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    steps = getattr(args, "steps", None)
    if (steps is not None and steps < 1) or getattr(args, "batch", 1) < 1:
        print("nagkit: error: --steps and --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CLIError as err:
        print(f"nagkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
