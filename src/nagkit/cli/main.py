"""``nagkit`` command line: ``demo``, ``generate``, ``batch``, ``ui``, ``info`` and ``bench``.

Examples::

    nagkit demo                                                             # offline, embedded model
    nagkit generate "a circle" --negative "red"                             # the embedded model
    nagkit generate black-forest-labs/FLUX.1-schnell "a corgi" --negative "blurry" --steps 4
    nagkit generate tiny-sdxl "a red cat" --negative "blurry" --out out/cat.png      # offline, built-in tiny model
    nagkit generate --from out/cat.json --nag-scale 5 --out out/cat5.png            # replay a sidecar, one change
    nagkit ui                                                               # web page: without / with NAG
    nagkit info Wan-AI/Wan2.1-T2V-1.3B-Diffusers

Parsing the command line and its argument errors import neither torch nor diffusers (each command's module is
imported when it runs); every user mistake is one line ``nagkit: error: …`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from .common import DTYPES, CLIError


def _lazy(module: str, name: str) -> Callable[..., int]:
    def run(args: argparse.Namespace, given: set[str]) -> int:
        fn = getattr(importlib.import_module(f".{module}", __package__), name)
        return fn(args, given) if module == "generate" else fn(args)

    run.__name__ = name
    return run


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``nagkit`` argument parser (commands are bound lazily: parsing imports neither torch nor diffusers)."""
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
    demo.add_argument("--out", default="nagkit_demo.png",
                      help="grid image path, .png/.jpg/.webp (default: nagkit_demo.png)")
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_lazy("demo", "cmd_demo"))

    gen = sub.add_parser(
        "generate", help="generate with NAG; writes images (PNG/JPEG/WebP) or videos (MP4/WebM/GIF) and a JSON "
                         "sidecar that replays them (--from)",
        description="Generate with NAG. Every option is checked before any weights load. CFG: --cfg-scale and "
                    "--cfg-negative map to the argument the pipeline uses (true_cfg_scale on FLUX, guidance_scale "
                    "elsewhere); --guidance is the pipeline's guidance_scale (FLUX.1-dev: the distilled guidance "
                    "embedding).")
    gen.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                     help="optional model (hub id, local pipeline folder, 'embedded' (the few-step student), "
                          "'embedded-teacher' or a built-in tiny model: "
                          "tiny-sdxl, tiny-flux, ...; default: the embedded model), then the prompt")
    gen.add_argument("--from", dest="from_", default=None, metavar="SIDECAR",
                     help="replay the settings of a sidecar JSON written by nagkit generate (options given here "
                          "override them)")
    gen.add_argument("--negative", default=None, help="NAG negative prompt (default: the CFG negative, else '')")
    gen.add_argument("--cfg-negative", default=None,
                     help="the pipeline's CFG negative_prompt (needs CFG: --cfg-scale > 1 on FLUX-style pipelines)")
    gen.add_argument("--cfg-scale", type=float, default=None,
                     help="CFG scale: true_cfg_scale on FLUX-style pipelines, guidance_scale elsewhere (CFG runs "
                          "above 1; Z-Image, Krea 2: above 0)")
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
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default 4; embedded-teacher: 8)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="the pipeline's guidance_scale (FLUX.1-dev: distilled guidance; elsewhere = --cfg-scale)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--frames", type=int, default=None, help="video frames")
    gen.add_argument("--fps", type=int, default=16, help="video frame rate (default 16)")
    gen.add_argument("--image", default=None, help="conditioning image (image-to-video)")
    gen.add_argument("--batch", type=int, default=1, help="images/videos per prompt")
    gen.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda if available)")
    gen.add_argument("--dtype", default="float32", choices=DTYPES)
    gen.add_argument("--offload", action="store_true", help="enable_model_cpu_offload()")
    gen.add_argument("--out", default="nagkit_out",
                     help="output file (.png .jpg .webp; videos .mp4 .webm .gif) or folder (default: nagkit_out/, "
                          "files numbered when taken)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    gen.set_defaults(func=_lazy("generate", "cmd_generate"))

    batch = sub.add_parser(
        "batch", help="many prompts/settings from a file: batched calls, one resumable JSONL manifest; "
                      "data-parallel under `accelerate launch -m nagkit batch`",
        description="Generate every row of a prompt file (text: one prompt per line; JSONL or CSV: fields prompt, "
                    "negative, cfg_negative, cfg_scale, guidance, seed, steps, nag_scale, nag_tau, nag_alpha, "
                    "preset, mode, nag_norm, start, end, height, width (or size WxH), frames). Options set every "
                    "row's defaults; numeric options take sweeps (--nag-scale 3,5,8 --seeds 0-3) over the fields a "
                    "row does not set. Rows are checked as nagkit generate checks them (a bad row is reported in "
                    "the manifest, the rest runs); rows with the same settings share a pipeline call; a rerun "
                    "skips the rows already in the manifest.")
    batch.add_argument("rows", metavar="FILE", help="prompt file: .txt (one prompt per line), .jsonl or .csv")
    batch.add_argument("--model", default="embedded",
                       help="model of every row (hub id, local pipeline folder, 'embedded', a tiny-* model)")
    batch.add_argument("--out", default="nagkit_batch", help="output folder (default: nagkit_batch/)")
    batch.add_argument("--manifest", default=None, help="JSONL manifest (default: OUT/manifest.jsonl)")
    batch.add_argument("--negative", default=None, help="default NAG negative prompt")
    batch.add_argument("--cfg-negative", default=None, help="default CFG negative_prompt")
    batch.add_argument("--seeds", default=None, help="seed sweep, e.g. 0-3 or 0,5,9 (default 0)")
    for option, what in (("--steps", "sampling steps"), ("--nag-scale", "nag_scale"), ("--nag-tau", "tau"),
                         ("--nag-alpha", "alpha"), ("--start", "NAG start"), ("--end", "NAG end"),
                         ("--cfg-scale", "CFG scale"), ("--guidance", "guidance_scale"), ("--height", "height"),
                         ("--width", "width"), ("--frames", "video frames")):
        batch.add_argument(option, default=None, help=f"{what}: a value or a comma-separated sweep")
    batch.add_argument("--preset", default=None, help="preset name (default: the model family's)")
    batch.add_argument("--mode", default=None, choices=("fast", "official"))
    batch.add_argument("--nag-norm", default=None, choices=("l1", "l2"))
    batch.add_argument("--batch-size", type=int, default=8, help="rows per pipeline call at most (default 8)")
    batch.add_argument("--format", default=None, choices=("png", "jpg", "webp", "mp4", "webm", "gif"),
                       help="output format (default: png, videos mp4)")
    batch.add_argument("--retry-failed", action="store_true", help="run rows the manifest records as failed again")
    batch.add_argument("--device", default=None, help="cuda, cpu, mps (default: the process's accelerate device)")
    batch.add_argument("--dtype", default="float32", choices=DTYPES)
    batch.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    batch.add_argument("--ray", action="store_true",
                       help="run on a Ray cluster (RAY_ADDRESS or --ray-address; else a local one): one pipeline "
                            "actor per GPU")
    batch.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    batch.add_argument("--ray-workers", type=int, default=None,
                       help="Ray actors (default: one per GPU of the cluster, 1 without GPUs)")
    batch.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # debug: a crash after N rows
    batch.set_defaults(func=_lazy("batch", "cmd_batch"))

    ui = sub.add_parser(
        "ui", help="web page (gradio) comparing the same seed without and with NAG (needs nagkit[ui])",
        description="Serve a gradio page: model, prompt, NAG negative, CFG negative, NAG scale/tau/alpha/start/end "
                    "(the family preset filled in), steps, seed; Generate shows the image without and with NAG "
                    "side by side (same seed), the seconds of each and the FLOP overhead of NAG. Offline on the "
                    "embedded model. Needs gradio: pip install \"nagkit[ui]\".")
    ui.add_argument("--model", default="embedded",
                    help="model the page starts with (default: embedded; a hub id, local pipeline folder, tiny-*)")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0: all)")
    ui.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    ui.add_argument("--share", action="store_true", help="also a public gradio.live link")
    ui.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda if available)")
    ui.add_argument("--dtype", default="float32", choices=DTYPES)
    ui.set_defaults(func=_lazy("ui", "cmd_ui"))

    info = sub.add_parser("info", help="does NAG support this model, and how")
    info.add_argument("model", help="hub id, local pipeline folder, 'embedded' or a built-in tiny model")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_lazy("info", "cmd_info"))

    bench = sub.add_parser("bench", help="cost of NAG/CFG: exact FLOPs on full-size models (no weights) or wall "
                                          "time on reduced models")
    bench.add_argument("--quality", action="store_true",
                       help="quality benchmark on the embedded model instead of cost: negative-attribute rate, "
                            "prompt fidelity, artifacts for none / CFG / NAG (fast and official) / VSF / NASA on the "
                            "few-step student (1-4 steps) and its teacher (8, 25) (about 5 min on 2 cores); "
                            "--markdown docs/quality.md")
    bench.add_argument("--seeds", type=int, default=64, help="quality: seeds per (pair, method, steps)")
    bench.add_argument("--mode", default="flops", choices=("flops", "time"),
                       help="flops: exact counts on the meta device (default); time: wall time and peak memory per "
                            "denoiser call on reduced configs with random weights (about 5 min on 2 CPU cores)")
    bench.add_argument("--family", action="append", default=None,
                       help="family to benchmark (repeatable; default: all): a name from "
                            "src/nagkit/bench/configs/, e.g. flux1-dev, sdxl, wan21-t2v-14b (an unknown name lists "
                            "them all)")
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
    bench.set_defaults(func=_lazy("bench", "cmd_bench"))
    return parser


def _given(parser: argparse.ArgumentParser, argv: list[str], command: str) -> set[str]:
    """The ``dest`` names of the options present on the command line (they override a ``--from`` sidecar): the
    arguments parsed again with every default of the command suppressed."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[command]._actions
    saved = [action.default for action in actions]
    for action in actions:
        action.default = argparse.SUPPRESS
    try:
        parsed = vars(parser.parse_args(argv))
    finally:
        for action, default in zip(actions, saved, strict=True):
            action.default = default
    present = set(parsed)
    words = parsed.get("words") or []
    present.update(["prompt"] if len(words) == 1 else ["model", "prompt"] if len(words) == 2 else [])
    return present - {"command", "func", "words"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nagkit`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for an unsupported model (``info``), 2 for a user error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, _given(parser, argv, args.command))
    except CLIError as err:
        print(f"nagkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nagkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
