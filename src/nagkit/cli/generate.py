"""``nagkit generate``: one pipeline call with NAG, its files and a JSON sidecar that replays it (``--from``).

Everything that can be checked is checked before any weights load, in three stages:

1. the arguments alone (ranges, the output path's format and folder) — no torch, no diffusers;
2. the model's configuration files (:func:`nagkit.cli.models.describe`): supported pipeline, options the pipeline
   takes, sizes and frame counts it accepts, what its CFG and guidance arguments do, the NAG settings and mode;
3. the device.

Then the weights load, the call runs with a progress bar, and the sidecar records what was produced (actual size,
frames, fps, the resolved NAG settings and preset, the CFG and guidance values that acted, seed, versions).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import EMBEDDED, EMBEDDED_MODELS, EMBEDDED_TEACHER, CLIError, TruncationNotice, quiet_libraries, say
from .models import ModelInfo, describe, load_pipeline, vae_factors
from .outputs import OutputPlan, check_out_syntax, check_video_writer, plan_outputs, write_outputs

SIDECAR_VERSION = 1
#: ``generate`` options a sidecar replays (argparse ``dest`` names); the command line overrides them.
REPLAYED = ("model", "prompt", "negative", "cfg_negative", "cfg_scale", "guidance", "nag_scale", "nag_tau",
            "nag_alpha", "preset", "mode", "nag_norm", "start", "end", "steps", "seed", "height", "width", "frames",
            "fps", "image", "batch", "dtype", "device")


# ------------------------------------------------------------------------------------------------ stage 1: arguments
def _range(name: str, value: float | None, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and value > high):
        bound = ("> " if low_open else ">= ") + f"{low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise CLIError(f"{name} must be {bound}, got {value:g}")


def check_arguments(args: argparse.Namespace) -> None:
    """Stage 1: ranges and the output path's syntax; imports neither torch nor diffusers.

    Raises:
        CLIError: naming the option and its allowed range.
    """
    for name in ("steps", "batch", "fps", "height", "width", "frames"):
        _range(f"--{name}", getattr(args, name), 1)
    _range("--seed", args.seed, 0)
    _range("--nag-scale", args.nag_scale, 0)
    _range("--nag-tau", args.nag_tau, 0, low_open=True)
    _range("--nag-alpha", args.nag_alpha, 0, 1)
    _range("--start", args.start, 0, 1)
    _range("--end", args.end, 0, 1)
    _range("--cfg-scale", args.cfg_scale, 0)
    _range("--guidance", args.guidance, 0)
    if args.start is not None and args.end is not None and args.start >= args.end:
        raise CLIError(f"--start must be below --end, got {args.start:g} and {args.end:g}")
    check_out_syntax(args.out)
    if args.image is not None and not Path(args.image).expanduser().is_file():
        raise CLIError(f"--image {args.image}: no such file")


def load_sidecar(args: argparse.Namespace, given: set[str]) -> None:
    """``--from SIDECAR``: fill every replayed option the command line did not give from the sidecar.

    Args:
        args: parsed arguments (changed in place).
        given: the ``dest`` names given on the command line.
    """
    path = Path(args.from_).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"--from {args.from_}: cannot read it: {err}") from None
    if not isinstance(data, dict) or data.get("nagkit_sidecar") != SIDECAR_VERSION:
        raise CLIError(f"--from {args.from_}: not a nagkit sidecar (written by `nagkit generate`, version "
                       f"{SIDECAR_VERSION})")
    replay = data.get("replay", {})
    for name in REPLAYED:
        if name not in given and name in replay:
            setattr(args, name, replay[name])


def split_model_prompt(args: argparse.Namespace) -> None:
    """``nagkit generate [MODEL] PROMPT``: a single positional is the prompt for the embedded model."""
    words = args.words or []
    if len(words) == 1:
        args.model, args.prompt = args.model or EMBEDDED, words[0]
    elif len(words) == 2:
        args.model, args.prompt = words
    elif words or args.prompt is None:
        raise CLIError(f"expected [MODEL] PROMPT, got {len(words)} positional arguments (quote the prompt)")
    args.model = args.model or EMBEDDED


# ------------------------------------------------------------------------------------------------ stage 2: the model
@dataclass
class CallPlan:
    """What the call will be, resolved before loading: arguments, CFG/guidance meaning, NAG settings, outputs."""

    info: ModelInfo
    spec: Any
    family: Any
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] | None = None
    cfg_value: float | None = None
    guidance: dict[str, Any] | None = None
    preset: str = ""
    nag: Any = None
    negative: str = ""
    negative_source: str = ""
    outputs: OutputPlan | None = None
    builtin_image: bool = False
    cfg_setter: Any = None


def default_preset(info: ModelInfo, spec: Any) -> str:
    """The preset a model gets by default: ``embedded`` for the embedded model, else the pipeline's."""
    return "embedded" if info.name in EMBEDDED_MODELS else spec.preset


def _signature(pipeline: str) -> dict[str, inspect.Parameter]:
    import diffusers

    klass = getattr(diffusers, pipeline, None)
    if klass is None:
        raise CLIError(f"{pipeline} is not a pipeline of this diffusers ({diffusers.__version__})")
    return dict(inspect.signature(klass.__call__).parameters)


def _default(params: dict[str, inspect.Parameter], name: str) -> Any:
    p = params.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _multiple_hint(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    return f"{low}" if low + multiple - value > value - low or value < multiple else f"{low + multiple}"


def plan_call(info: ModelInfo, args: argparse.Namespace) -> CallPlan:
    """Stage 2: check the options against the pipeline and resolve what the call does.

    Args:
        info: the described model.
        args: the arguments (after :func:`check_arguments`).

    Returns:
        The :class:`CallPlan` (no weights loaded).

    Raises:
        CLIError: an unsupported model, an option the pipeline does not take or ignores, a size or frame count the
            pipeline refuses or changes, invalid NAG settings.
    """
    from ..adapters import base as adapters
    from ..core.config import get_preset
    from ..integration.pipelines import PIPELINES
    from .info import support_report

    report = support_report(info)
    if not report["supported"]:
        raise CLIError(f"{info.name}: not supported: {report['reason']} (supported pipelines: "
                       f"{', '.join(report['supported_pipelines'])})")
    spec = PIPELINES[info.pipeline]
    family = next(a for a in adapters._REGISTRY if a.family == report["family"])
    params = _signature(info.pipeline)
    # the frame-count argument: ``num_frames`` (Wan, LTX, HunyuanVideo) or ``frames`` (SANA-Video)
    frames_arg = "num_frames" if "num_frames" in params else "frames" if "frames" in params else "num_frames"
    kind = "video" if frames_arg in params else "image"
    plan = CallPlan(info=info, spec=spec, family=family, kind=kind)
    kw = plan.kwargs
    builtin_defaults: dict[str, Any] = {}
    if info.name in EMBEDDED_MODELS:
        from ..toy.model import EMBEDDED_CALL_KWARGS

        builtin_defaults = dict(EMBEDDED_CALL_KWARGS)
    elif info.kind == "builtin":
        builtin_defaults = dict(adapters.TINY_MODELS[info.name].call_kwargs)
    builtin_defaults.pop("num_inference_steps", None)
    kw.update({"prompt": args.prompt, "num_inference_steps": args.steps})

    def takes(name: str, option: str) -> None:
        if name not in params:
            raise CLIError(f"{option} is not an option of {info.pipeline}")

    # required call inputs the command line cannot give (WanAnimatePipeline's pose and face videos)
    required = [n for n, p in params.items() if n not in ("self", "prompt", "image") and p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise CLIError(f"{info.pipeline} needs {', '.join(required)}, which nagkit generate cannot give; use the "
                       "Python API (nagkit.apply(pipe, negative_prompt=...), then call the pipeline)")

    # sizes: multiples the pipeline accepts as given (it would raise, or silently round them)
    spatial, temporal = vae_factors(info.config("vae"))
    multiple = spatial * spec.size_multiple
    for option, name in (("--height", "height"), ("--width", "width")):
        value = getattr(args, name)
        if value is None:
            continue
        takes(name, option)
        if value % multiple:
            raise CLIError(f"{option} {value}: {info.pipeline} needs a multiple of {multiple} "
                           f"(try {_multiple_hint(value, multiple)})")
        kw[name] = value
    if args.frames is not None:
        takes(frames_arg, "--frames")
        if (args.frames - 1) % temporal:
            near = max(1, round((args.frames - 1) / temporal)) * temporal + 1
            raise CLIError(f"--frames {args.frames}: {info.pipeline} makes {temporal}k+1 frames (try {near})")
        kw[frames_arg] = args.frames
    if args.batch > 1:
        name = spec.count_arg if spec.count_arg in params else None
        if name is None:
            raise CLIError(f"--batch is not an option of {info.pipeline}")
        kw[name] = args.batch
    if args.image is not None:
        takes("image", "--image")
        kw["image"] = args.image  # opened after loading
    elif "image" in params and (params["image"].default is inspect.Parameter.empty or spec.requires_image):
        if info.name == "tiny-wan-i2v":
            plan.builtin_image = True
        else:
            raise CLIError(f"{info.pipeline} needs a conditioning image: --image PATH")

    # CFG and guidance: what the pipeline's arguments actually do
    if spec.cfg_arg == "auto":
        cfg_arg = "true_cfg_scale" if "true_cfg_scale" in params else (
            "guidance_scale" if "guidance_scale" in params else None)
    else:
        cfg_arg = spec.cfg_arg or None
    if info.index.get("is_distilled"):  # e.g. a step-distilled FLUX.2 Klein: its pipeline never runs CFG
        cfg_arg = None
    elif cfg_arg is None and spec.cfg_setter is not None:  # a pipeline setting (HunyuanVideo 1.5's guider)
        plan.cfg_setter = spec.cfg_setter
        cfg_arg = getattr(spec.cfg_setter, "setting", "the pipeline's CFG setting")
    true_cfg = cfg_arg == "true_cfg_scale"
    guidance_embeds = bool((info.config("transformer") or {}).get("guidance_embeds", False))
    distilled_guidance = "guidance_scale" in params and cfg_arg != "guidance_scale" and guidance_embeds
    if args.guidance is not None:
        if "guidance_scale" not in params:
            raise CLIError(f"--guidance is not an option of {info.pipeline}")
        if cfg_arg == "guidance_scale":  # guidance_scale is the CFG scale here
            if args.cfg_scale is not None and args.cfg_scale != args.guidance:
                raise CLIError(f"--guidance and --cfg-scale are the same argument of {info.pipeline} "
                               "(guidance_scale); give one")
            args.cfg_scale = args.guidance
        elif not distilled_guidance:
            raise CLIError(f"--guidance has no effect on {info.name}: its transformer has no guidance embedding "
                           "(a FLUX.1-schnell-style or distilled model); for CFG with a negative use --cfg-scale and "
                           "--cfg-negative where the model has CFG")
    if (args.cfg_scale is not None or args.cfg_negative is not None) and cfg_arg is None:
        raise CLIError(f"{info.name} ({info.pipeline}) runs no CFG: --cfg-scale/--cfg-negative do not apply "
                       "(NAG is its negative prompt)")
    if args.cfg_negative is not None:
        takes("negative_prompt", "--cfg-negative")
    cfg_scale = None if cfg_arg is None else (
        args.cfg_scale if args.cfg_scale is not None else builtin_defaults.get(cfg_arg, _default(params, cfg_arg)))
    if plan.cfg_setter is not None and args.cfg_scale is None:  # the pipeline's own setting (built-in: known now)
        cfg_scale = plan.cfg_setter(info.pipe, None)[0] if info.pipe is not None else None
    cfg_on = cfg_scale is not None and cfg_scale > spec.cfg_min
    if true_cfg and args.cfg_negative is None and args.cfg_scale is None:
        cfg_on = False  # FLUX/Qwen-style pipelines run true CFG only with a negative: none given, none run
        kw[cfg_arg] = 1.0  # say so to the pipeline (Qwen-Image's default 4.0 would warn that it is ignored)
        plan.cfg_value = None  # a replay gives no scale either
    plan.cfg_value = None if cfg_scale is None else float(cfg_scale)
    if args.cfg_negative is not None and not cfg_on:
        raise CLIError(f"--cfg-negative has no effect without CFG: {info.pipeline} runs it with {cfg_arg} > "
                       f"{spec.cfg_min:g} (add --cfg-scale, e.g. 4)")
    if cfg_arg is not None and args.cfg_scale is not None and plan.cfg_setter is None:
        kw[cfg_arg] = args.cfg_scale
    if cfg_on:
        cfg_negative = args.cfg_negative
        if true_cfg and cfg_negative is None:
            cfg_negative = ""  # FLUX-style true CFG runs only with a negative: the empty prompt, as other pipelines
        if cfg_negative is not None:
            kw["negative_prompt"] = cfg_negative
        plan.cfg = {"argument": cfg_arg, "scale": float(cfg_scale), "negative": cfg_negative}
    if distilled_guidance:
        value = args.guidance if args.guidance is not None else builtin_defaults.get(
            "guidance_scale", _default(params, "guidance_scale"))
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        plan.guidance = {"argument": "guidance_scale", "value": value, "meaning": "distilled guidance embedding"}
    for key, value in builtin_defaults.items():
        kw.setdefault(key, value)

    # NAG: the negative, the preset and every value, validated here
    if args.negative is not None:
        plan.negative, plan.negative_source = args.negative, "--negative"
    elif plan.cfg is not None and plan.cfg["negative"]:
        plan.negative, plan.negative_source = plan.cfg["negative"], "the CFG negative"
    else:
        plan.negative, plan.negative_source = "", "empty"
    plan.preset = args.preset or default_preset(info, spec)
    try:
        base = get_preset(plan.preset)
        mode = args.mode or base.mode
        if mode == "official" and not family.official:
            raise ValueError(f"--mode official is not available for {info.pipeline} (no official NAG "
                             "implementation exists for this family); use --mode fast")
        norm = args.nag_norm
        if norm is None and args.mode is not None and args.mode != base.mode:
            norm = family.official_norm if args.mode == "official" else "l1"
        plan.nag = base.with_updates(scale=args.nag_scale, tau=args.nag_tau, alpha=args.nag_alpha, start=args.start,
                                     end=args.end, norm=norm, mode=args.mode)
    except (KeyError, ValueError, TypeError) as err:
        raise CLIError(str(err).strip("'\"")) from None
    return plan


# ------------------------------------------------------------------------------------------------ stage 3: device
def resolve_device(device: str | None, offload: bool) -> str:
    """The device string, checked against this torch (CUDA/MPS present), before loading."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                       "use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CLIError(f"--device {device}: nagkit runs on cpu, cuda or mps")
    if offload and parsed.type == "cpu":
        raise CLIError("--offload moves models between the CPU and an accelerator: it needs --device cuda")
    return device


# ------------------------------------------------------------------------------------------------ the command
def _count_tokens(pipe: Any) -> Any:
    tokenizers = [getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    tokenizers = [t for t in tokenizers if t is not None]

    def count(text: str, why: str) -> int:
        clip = [t for t in tokenizers if "CLIP" in type(t).__name__]
        other = [t for t in tokenizers if "CLIP" not in type(t).__name__]
        pool = clip if "CLIP" in why and clip else (other or tokenizers)
        if not pool:
            return len(text.split())
        return len(pool[0](text, add_special_tokens=False).input_ids)

    return count


def cmd_generate(args: argparse.Namespace, given: set[str] | None = None) -> int:
    """Run ``nagkit generate`` (see the module docstring).

    Args:
        args: parsed ``generate`` arguments.
        given: the option names given on the command line (they override ``--from``).

    Returns:
        The exit status (0).
    """
    args.model, args.prompt = getattr(args, "model", None), getattr(args, "prompt", None)
    if args.from_ is not None:
        load_sidecar(args, given or set())
    split_model_prompt(args)
    if args.steps is None:
        args.steps = 8 if args.model == EMBEDDED_TEACHER else 4  # the embedded student: 4
    check_arguments(args)
    quiet_libraries()
    say(f"reading {args.model} ...", args.quiet)
    info = describe(args.model)
    plan = plan_call(info, args)
    count = args.batch
    plan.outputs = plan_outputs(args.out, count, plan.kind, overwrite=args.overwrite)
    if plan.kind == "video":
        check_video_writer(plan.outputs.suffix)
    args.device = resolve_device(args.device, args.offload)
    image = None
    if args.image is not None:
        from PIL import Image

        try:
            image = Image.open(Path(args.image).expanduser()).convert("RGB")
        except OSError as err:
            raise CLIError(f"--image {args.image}: cannot read it as an image: {err}") from None

    import diffusers
    import torch

    from .. import __version__, apply

    started = time.perf_counter()
    say(f"loading {args.model} ...", args.quiet)
    pipe = load_pipeline(info, args.dtype, args.device, args.offload)
    pipe.set_progress_bar_config(disable=args.quiet)
    kwargs = dict(plan.kwargs)
    if image is not None:
        kwargs["image"] = image
    elif plan.builtin_image:
        from ..tiny.pipelines import tiny_condition_image

        kwargs["image"] = tiny_condition_image()
    kwargs["generator"] = torch.Generator(device="cpu" if args.offload else args.device).manual_seed(args.seed)
    c = plan.nag
    guide = apply(pipe, negative_prompt=plan.negative, scale=c.scale, tau=c.tau, alpha=c.alpha, start=c.start,
                  end=c.end, norm=c.norm, mode=c.mode, preset=plan.preset)
    say(f"NAG ({plan.preset}): scale={c.scale:g} tau={c.tau:g} alpha={c.alpha:g} window={c.start:g}-{c.end:g} "
        f"{c.mode}; negative: {plan.negative!r}", args.quiet)
    notice = TruncationNotice({"the prompt": args.prompt, "the NAG negative": plan.negative,
                               "the CFG negative": (plan.cfg or {}).get("negative") or ""}, _count_tokens(pipe))
    restore_cfg = None
    if plan.cfg_setter is not None:  # the CFG scale is a pipeline setting: set for this call, restored after
        value, restore_cfg = plan.cfg_setter(pipe, args.cfg_scale)
        if plan.cfg is None and value is not None and value > plan.spec.cfg_min:  # a loaded model's own setting
            plan.cfg_value, plan.cfg = value, {"argument": getattr(plan.cfg_setter, "setting", None),
                                               "scale": value, "negative": kwargs.get("negative_prompt")}
    handlers = diffusers.utils.logging.get_logger("diffusers").handlers or []
    for handler in handlers:
        handler.addFilter(notice)
    try:
        result = pipe(**kwargs)
    finally:
        for handler in handlers:
            handler.removeFilter(notice)
        guide.remove()
        if restore_cfg is not None:
            restore_cfg()
    written = write_outputs(result, plan.outputs, args.fps)
    first = written[0]
    produced = {"width": first["width"], "height": first["height"], "frames": first.get("frames"),
                "fps": first.get("fps")}
    replay = {
        "model": args.model, "prompt": args.prompt, "negative": plan.negative,
        "cfg_negative": (plan.cfg or {}).get("negative"), "cfg_scale": plan.cfg_value,
        "guidance": plan.guidance["value"] if plan.guidance else None,
        "nag_scale": c.scale, "nag_tau": c.tau, "nag_alpha": c.alpha, "preset": plan.preset, "mode": c.mode,
        "nag_norm": c.norm, "start": c.start, "end": c.end, "steps": args.steps, "seed": args.seed,
        "height": produced["height"], "width": produced["width"], "frames": produced["frames"],
        "fps": produced["fps"] or args.fps, "image": args.image, "batch": args.batch, "dtype": args.dtype,
        "device": args.device,
    }
    if plan.kind == "image":
        replay.pop("frames")
    sidecar = {
        "nagkit_sidecar": SIDECAR_VERSION,
        "model": args.model, "pipeline": info.pipeline, "family": plan.family.family,
        "prompt": args.prompt,
        "nag": {"preset": plan.preset, **c.to_dict(), "negative": plan.negative,
                "negative_from": plan.negative_source},
        "cfg": plan.cfg, "guidance": plan.guidance,
        "steps": args.steps, "seed": args.seed, "batch": args.batch, **produced,
        "image": args.image if args.image is not None else ("built-in condition image" if plan.builtin_image
                                                             else None),
        "device": args.device, "dtype": args.dtype, "offload": args.offload,
        "files": [w["file"] for w in written],
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {"nagkit": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
                     "transformers": _version("transformers")},
        "replay": replay,
    }
    if plan.kind == "image":
        sidecar.pop("frames")
        sidecar.pop("fps")
    plan.outputs.sidecar.write_text(json.dumps(sidecar, indent=2) + "\n")
    for w in written:
        print(w["file"])
    print(plan.outputs.sidecar)
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
