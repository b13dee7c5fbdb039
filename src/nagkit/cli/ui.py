"""``nagkit ui``: a gradio page that shows the same seed without and with NAG, side by side.

The page takes a model (default: the embedded model, offline; any local or hub pipeline path, or a built-in tiny-*
model), the prompt, the NAG negative, the CFG negative (and scale), NAG scale / tau / alpha / start / end (filled in
with the model family's preset), steps and seed. *Generate* runs the pipeline twice with the same seed, without and
with NAG, and shows both images, the seconds of each call and the FLOP overhead of NAG.

The FLOP overhead is counted on the loaded model with :class:`torch.utils.flop_counter.FlopCounterMode`: one
denoiser step without and one with NAG (NAG active on that step), the denoiser's calls only (text encoders and the
autoencoder are not counted). The full-size families' overheads are in ``docs/benchmarks.md``.

Every checked mistake (a setting out of range, a model nagkit does not support, a failing load) is shown as one line
on the page (``gr.Error``), never a traceback. Needs the ``ui`` extra: ``pip install "nagkit[ui]"``.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from .common import EMBEDDED, EMBEDDED_TEACHER, CLIError, quiet_libraries

#: Side of the images shown on the page (the embedded model makes 32x32 images: enlarged, nearest neighbour).
SHOW_SIDE = 256
EXAMPLE_PROMPT = "a circle"
EXAMPLE_NEGATIVE = "red"


def _namespace(model: str, prompt: str, negative: str | None, cfg_negative: str | None, cfg_scale: float | None,
               scale: float | None, tau: float | None, alpha: float | None, start: float | None, end: float | None,
               steps: int | None, seed: int | None, device: str | None, dtype: str) -> argparse.Namespace:
    """The ``nagkit generate`` arguments of one page request (so the same checks and planning apply)."""
    return argparse.Namespace(
        model=model, prompt=prompt, negative=negative, cfg_negative=cfg_negative, cfg_scale=cfg_scale,
        guidance=None, nag_scale=scale, nag_tau=tau, nag_alpha=alpha, preset=None, mode=None, nag_norm=None,
        start=start, end=end, steps=steps, seed=seed, height=None, width=None, frames=None, fps=16, image=None,
        batch=1, dtype=dtype, device=device, offload=False, out="nagkit_out", overwrite=False, quiet=True, from_=None)


def _number(value: Any, name: str = "value") -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise CLIError(f"{name} must be a number, got {value!r}") from None


def _integer(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if float(value) != int(float(value)):
        raise CLIError(f"{name} must be a whole number, got {value}")
    return int(float(value))


def _text(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _enlarge(image: Any) -> Any:
    """A PIL image for the page: converted from arrays/tensors, small images enlarged (nearest neighbour)."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(array.squeeze())
    image = image.convert("RGB")
    if max(image.size) < SHOW_SIDE:
        factor = max(1, SHOW_SIDE // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return image


class Session:
    """Loaded pipelines (one per model name, reused across requests) and the two generations of a request."""

    def __init__(self, device: str | None = None, dtype: str = "float32") -> None:
        self.device, self.dtype = device, dtype
        self._pipes: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- presets
    def preset(self, model: str) -> dict[str, Any]:
        """The NAG settings and steps the model's family preset gives (no weights loaded).

        Raises:
            CLIError: an unknown or unsupported model.
        """
        from .generate import plan_call
        from .models import describe

        model = (model or "").strip() or EMBEDDED
        args = _namespace(model, EXAMPLE_PROMPT, None, None, None, None, None, None, None, None,
                          8 if model == EMBEDDED_TEACHER else 4, 0, self.device, self.dtype)
        plan = plan_call(describe(model), args)
        c = plan.nag
        return {"preset": plan.preset, "scale": c.scale, "tau": c.tau, "alpha": c.alpha, "start": c.start,
                "end": c.end, "steps": args.steps}

    # -------------------------------------------------------------------------------------------- generation
    def _load(self, model: str) -> tuple[Any, Any]:
        from .generate import resolve_device
        from .models import describe, load_pipeline

        if model not in self._pipes:
            info = describe(model)
            self.device = resolve_device(self.device, False)
            pipe = load_pipeline(info, self.dtype, self.device, False)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = (info, pipe)
        return self._pipes[model]

    def generate(self, model: str, prompt: str, negative: str | None = None, cfg_negative: str | None = None,
                 cfg_scale: float | None = None, scale: float | None = None, tau: float | None = None,
                 alpha: float | None = None, start: float | None = None, end: float | None = None,
                 steps: int | None = None, seed: int | None = 0) -> dict[str, Any]:
        """Generate the same seed without and with NAG.

        Returns:
            ``{"without": PIL image, "with": PIL image, "seconds_without", "seconds_with", "flops_without",
            "flops_with", "overhead" (fraction), "nag" (the resolved settings), "preset"}``.

        Raises:
            CLIError: a setting out of range, an unsupported model or option, a failing load (one line).
        """
        from .generate import check_arguments, plan_call

        model = (model or "").strip() or EMBEDDED
        if not (prompt or "").strip():
            raise CLIError("the prompt is empty")
        if steps is None:
            steps = 8 if model == EMBEDDED_TEACHER else 4
        args = _namespace(model, prompt, negative, cfg_negative, cfg_scale, scale, tau, alpha, start, end, steps,
                          0 if seed is None else seed, self.device, self.dtype)
        check_arguments(args)
        quiet_libraries()
        with self._lock:
            info, pipe = self._load(model)
            plan = plan_call(info, args)
            if plan.kind != "image":
                raise CLIError(f"{info.pipeline} makes videos; the page shows images (use nagkit generate)")
            return self._run(pipe, plan, args)

    def _run(self, pipe: Any, plan: Any, args: argparse.Namespace) -> dict[str, Any]:
        import torch

        from .. import apply

        kwargs = dict(plan.kwargs)
        if plan.builtin_image:
            from ..tiny.pipelines import tiny_condition_image

            kwargs["image"] = tiny_condition_image()
        c = plan.nag
        restore_cfg = None
        if plan.cfg_setter is not None:
            _, restore_cfg = plan.cfg_setter(pipe, args.cfg_scale)

        def call(nag: bool, counted: bool = False) -> tuple[Any, float]:
            call_kwargs = dict(kwargs, generator=torch.Generator(device=self.device).manual_seed(args.seed))
            if counted:
                call_kwargs["num_inference_steps"] = 1
            guide = None
            if nag:  # the FLOP count keeps NAG on for its one step (the overhead of a guided step)
                guide = apply(pipe, negative_prompt=plan.negative, scale=c.scale, tau=c.tau, alpha=c.alpha,
                              start=0.0 if counted else c.start, end=1.0 if counted else c.end, norm=c.norm,
                              mode=c.mode, preset=plan.preset)
            started = time.perf_counter()
            try:
                result = pipe(**call_kwargs)
            finally:
                if guide is not None:
                    guide.remove()
            return result, time.perf_counter() - started

        try:
            flops_without = _denoiser_flops(pipe, lambda: call(False, counted=True))  # also warms the pipeline up
            flops_with = _denoiser_flops(pipe, lambda: call(True, counted=True))
            plain, seconds_without = call(False)
            guided, seconds_with = call(True)
        finally:
            if restore_cfg is not None:
                restore_cfg()
        overhead = (flops_with - flops_without) / flops_without if flops_without else None
        return {"without": _enlarge(_first(plain)), "with": _enlarge(_first(guided)),
                "seconds_without": seconds_without, "seconds_with": seconds_with, "flops_without": flops_without,
                "flops_with": flops_with, "overhead": overhead, "nag": c.to_dict(), "preset": plan.preset,
                "negative": plan.negative}


def _first(result: Any) -> Any:
    images = getattr(result, "images", None)
    if images is None:
        images = result[0]
    return images[0]


def _denoiser(pipe: Any) -> Any:
    for name in ("transformer", "unet", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise CLIError(f"{type(pipe).__name__}: no transformer or unet to count FLOPs on")


def _denoiser_flops(pipe: Any, run: Any) -> int:
    """FLOPs of the denoiser's calls while ``run()`` runs (text encoders and autoencoder excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = _denoiser(pipe)
    total = [0]
    active: list[Any] = []

    def pre(module: Any, inputs: Any) -> None:
        counter = FlopCounterMode(display=False)
        counter.__enter__()
        active.append(counter)

    def post(module: Any, inputs: Any, output: Any) -> None:
        counter = active.pop()
        counter.__exit__(None, None, None)
        total[0] += counter.get_total_flops()

    handles = [denoiser.register_forward_pre_hook(pre), denoiser.register_forward_hook(post)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        while active:
            active.pop().__exit__(None, None, None)
    return total[0]


# ------------------------------------------------------------------------------------------------ the page
def _summary(out: dict[str, Any]) -> str:
    c = out["nag"]
    overhead = "n/a" if out["overhead"] is None else f"{out['overhead'] * 100:+.2f}%"
    return (f"**without NAG:** {out['seconds_without']:.2f} s &nbsp;·&nbsp; **with NAG:** "
            f"{out['seconds_with']:.2f} s &nbsp;·&nbsp; **FLOP overhead of NAG:** {overhead} per guided denoiser "
            f"step ({out['flops_without'] / 1e9:.3f} → {out['flops_with'] / 1e9:.3f} GFLOPs, counted on the loaded "
            f"model with torch.utils.flop_counter; full-size families: docs/benchmarks.md)  \n"
            f"NAG ({out['preset']}): scale={c['scale']:g} tau={c['tau']:g} alpha={c['alpha']:g} "
            f"window={c['start']:g}-{c['end']:g} {c['mode']}; negative: {out['negative']!r}")


def build_app(model: str = EMBEDDED, device: str | None = None, dtype: str = "float32") -> Any:
    """The gradio ``Blocks`` app (not launched).

    Args:
        model: the model the page starts with.
        device: torch device (default: cuda if available, else cpu).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
    """
    import gradio as gr

    session = Session(device=device, dtype=dtype)
    try:
        start = session.preset(model)
    except CLIError as err:
        raise CLIError(f"--model {model}: {err}") from None

    def fill(model_name: str) -> tuple[Any, ...]:
        try:
            p = session.preset(model_name)
        except CLIError as err:
            raise gr.Error(_one_line(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - one line on the page, never a traceback
            raise gr.Error(f"{type(err).__name__}: {_one_line(err)}", print_exception=False) from None
        return (p["scale"], p["tau"], p["alpha"], p["start"], p["end"], p["steps"],
                f"preset **{p['preset']}** filled in")

    def run(model_name: str, prompt: str, negative: str, cfg_negative: str, cfg_scale: Any, scale: Any, tau: Any,
            alpha: Any, start_: Any, end_: Any, steps: Any, seed: Any) -> tuple[Any, Any, str]:
        try:
            out = session.generate(model_name, prompt, _text(negative), _text(cfg_negative),
                                   _number(cfg_scale, "CFG scale"),
                                   _number(scale), _number(tau), _number(alpha), _number(start_), _number(end_),
                                   _integer(steps, "steps"), _integer(seed, "seed"))
        except CLIError as err:
            raise gr.Error(_one_line(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - one line on the page, never a traceback
            raise gr.Error(f"{type(err).__name__}: {_one_line(err)}", print_exception=False) from None
        return out["without"], out["with"], _summary(out)

    with gr.Blocks(title="nagkit: Normalized Attention Guidance") as app:
        gr.Markdown("## nagkit — Normalized Attention Guidance\nThe same seed without and with NAG. The embedded "
                    "model (32×32 shapes) understands prompts like *a blue circle at the top left on a white "
                    "background*; negatives name colours, kinds, sizes or positions.")
        with gr.Row():
            with gr.Column(scale=1):
                model_box = gr.Textbox(label="model", value=model, elem_id="model",
                                       info="embedded, embedded-teacher, tiny-*, a local pipeline folder or hub id")
                prompt = gr.Textbox(label="prompt", value=EXAMPLE_PROMPT, elem_id="prompt")
                negative = gr.Textbox(label="NAG negative", value=EXAMPLE_NEGATIVE, elem_id="negative")
                with gr.Row():
                    cfg_negative = gr.Textbox(label="CFG negative", value="", elem_id="cfg-negative")
                    cfg_scale = gr.Textbox(label="CFG scale", value="", placeholder="empty: the pipeline's",
                                           elem_id="cfg-scale")
                with gr.Row():
                    scale = gr.Number(label="NAG scale", value=start["scale"], elem_id="nag-scale")
                    tau = gr.Number(label="τ (tau)", value=start["tau"], elem_id="nag-tau")
                    alpha = gr.Number(label="α (alpha)", value=start["alpha"], elem_id="nag-alpha")
                with gr.Row():
                    start_box = gr.Number(label="start", value=start["start"], elem_id="nag-start")
                    end_box = gr.Number(label="end", value=start["end"], elem_id="nag-end")
                with gr.Row():
                    steps = gr.Number(label="steps", value=start["steps"], precision=0, elem_id="steps")
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    without = gr.Image(label="without NAG", type="pil", format="png", elem_id="without-nag",
                                       interactive=False)
                    with_ = gr.Image(label="with NAG", type="pil", format="png", elem_id="with-nag",
                                     interactive=False)
                summary = gr.Markdown(f"preset **{start['preset']}**", elem_id="summary")
        presets = [scale, tau, alpha, start_box, end_box, steps, summary]
        model_box.submit(fill, inputs=[model_box], outputs=presets)
        button.click(run, inputs=[model_box, prompt, negative, cfg_negative, cfg_scale, scale, tau, alpha, start_box,
                                  end_box, steps, seed], outputs=[without, with_, summary], concurrency_limit=1)
    return app


def cmd_ui(args: argparse.Namespace) -> int:
    """Run ``nagkit ui``: serve the page until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError('nagkit ui needs gradio: pip install "nagkit[ui]"') from None
    quiet_libraries()
    app = build_app(model=args.model, device=args.device, dtype=args.dtype)
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                       inbrowser=False)
    return 0
