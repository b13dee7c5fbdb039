"""Time mode of ``nagkit bench``: wall time per denoiser call, and its peak memory, on reduced configs.

Full-size denoisers do not fit a CPU's time budget (one FLUX.1-dev double block at 1024² is about a TFLOP), so time
mode runs each family's *reduced* config (:meth:`nagkit.bench.families.FamilySpec.for_time`: fewer blocks, and where
needed every width and token count divided by the same factor, which keeps the share of attention, of the linear
layers and of the text tokens) with real, seeded random weights. Every variant is timed on the same model object:

* ``none``: one conditional forward, batch B;
* ``cfg``: classifier-free guidance as the family's diffusers pipeline calls it: one forward of batch 2B
  (unconditional + conditional: SD1.5, SDXL, PixArt, Sana, SD3), or two forwards of batch B (Wan, Flux's
  ``true_cfg_scale`` and Chroma: the family's ``Adapter.separate_cfg``);
* ``nag``: nagkit, ``nagkit.apply(model, negative={...})`` (``mode="fast"``), one forward of batch B;
* ``official``: the official implementation's computation. Cross-attention families: the in-repo reference
  (:mod:`nagkit.bench.reference`) on the packed text; joint-attention families: ``mode="official"`` inside
  :func:`nagkit.kernels.joint.force_two_attentions` (two full joint attentions; Flux single blocks batch-doubled);
  Chroma: the in-repo reference of ComfyUI-NAG's computation (:data:`nagkit.bench.reference.OFFICIAL_WAY`);
* ``nag+cfg``: two forwards, the unconditional call plain and the conditional call guided. That is how the Wan and
  Flux pipelines call the denoiser; the batched-CFG pipelines make one call of batch 2B with the conditional half
  guided, which ``nagkit.apply(denoiser, negative=...)`` cannot express for B = 1 (a one-row negative guides every
  row), so for them ``nag+cfg − cfg`` also holds the difference between one batched call and two calls.

Installing and removing NAG or the reference processors happens outside the timed region. The variants are run
round-robin (each round starts one variant later), after ``warmup`` untimed rounds; a variant's time is the median
over the ``repeats`` timed rounds and its overhead the median of its per-round ratio to ``none`` in the same round,
so slow drifts of the machine cancel. Before the first round, one plain forward and each call that installs
something (NAG, the reference processors) run once untimed (:func:`prime_calls`): one-time work — the first forward,
the compilation of nagkit's NAG combination (:func:`nagkit.core.operator.nag_combine`) — lands in no timed round and
no memory measurement. Peak memory per variant (see :class:`PeakMemory`) is measured in the first warm-up round (in
an extra last round without warm-up), after one more plain forward. FLOPs of the same reduced config are counted on
the meta device for comparison. The report's settings say how the NAG combination ran (compiled or eager).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .families import FamilySpec, Inputs, _quiet_diffusers, build_inputs, build_model, parameter_count
from .flops import count_flops, count_guided, drops_padding, packed_kwargs
from .reference import OFFICIAL_WAY, OfficialLayout, official_processors

TIME_VARIANTS = ("none", "cfg", "nag", "official", "nag+cfg")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_PR_SET_THP_DISABLE = 41  # Linux prctl option
#: Input builders (``FamilySpec.inputs``) whose pipelines run CFG as two separate denoiser calls.
def separate_cfg(spec: FamilySpec) -> bool:
    """Whether the family's pipelines run CFG as two denoiser calls (the family file's ``Adapter.separate_cfg``)."""
    return _adapter(spec).separate_cfg


def _adapter(spec: FamilySpec) -> Any:
    import diffusers

    from ..adapters.base import find_adapter_class

    adapter = find_adapter_class(getattr(diffusers, spec.model_class))
    if adapter is None:
        raise ValueError(f"no nagkit family for {spec.model_class}")
    return adapter


# ------------------------------------------------------------------------------------------------ machine
def cpu_info() -> dict[str, Any]:
    """The CPU as ``/proc/cpuinfo`` names it (Linux; ``platform.processor()`` elsewhere).

    Returns:
        ``{"model", "family", "model_id", "flags", "logical_cpus"}``: the model name, the x86 family and model
        numbers (None where unknown), the vector-extension flags that matter for matmuls (``avx2``, ``avx512f``,
        ``avx512_bf16``, ``amx_bf16``, present ones only) and ``os.cpu_count()``.
    """
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "family": None, "model_id": None,
                            "flags": [], "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["model"] = fields.get("model name", info["model"])
    info["family"] = fields.get("cpu family")
    info["model_id"] = fields.get("model")
    flags = set(fields.get("flags", "").split())
    info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return info


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the times were measured on.

    Args:
        device: the benchmark device.

    Returns:
        ``{"device", "device_name", "cpu", "torch_threads"}``.
    """
    name = "cpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {"device": str(device), "device_name": name, "cpu": cpu_info(), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory growth of one measured region, per device.

    CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``) is reset to the current resident set
    by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0) after ``gc.collect()`` and glibc's
    ``malloc_trim(0)`` (so memory freed by earlier variants is handed back and does not hide new allocations);
    the growth is ``VmHWM`` after the region minus ``VmRSS`` before it. Inside :meth:`precise` glibc serves every
    allocation of 64 KiB or more with its own ``mmap`` (returned on free) and transparent huge pages are off, which
    makes a fresh process repeatable to about 1 MB; after earlier families' timed rounds (heap state left behind)
    repeated runs still differ by 10–50 MB. (It cannot be used for the timed rounds: it slows them by 10–30 %.)
    It needs no
    subprocess and no tracing (``tracemalloc`` does not see PyTorch's allocations), measures in the process that
    holds the model, and includes everything the region touches: activations, attention workspaces, allocator
    slack. Unavailable (None) where ``/proc/self/clear_refs`` is not writable.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, minus the memory
    allocated before the region (tensors only, not the caching allocator's reserve).

    Args:
        device: the benchmark device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._baseline = 0
        self.available = device.type == "cuda" or self._cpu_available()

    @staticmethod
    def _cpu_available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return PeakMemory._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    @staticmethod
    def _malloc_trim() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    @staticmethod
    def _mallopt(mmap_threshold: int) -> bool:
        """Fix glibc's mmap threshold (and the trim threshold at twice it); False where glibc is not there."""
        try:
            libc = ctypes.CDLL("libc.so.6")
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold))
        except (OSError, AttributeError):
            return False

    @staticmethod
    def steady_allocator() -> bool:
        """Fix glibc's thresholds at the values its dynamic adjustment ends at (mmap 32 MiB, trim 64 MiB), so
        that every timed round of every family runs with the same allocator settings (for the rest of the process).

        Returns:
            Whether glibc accepted them.
        """
        return PeakMemory._mallopt(32 * 2 ** 20)

    @contextlib.contextmanager
    def precise(self) -> Iterator[None]:
        """CPU: inside the block, serve allocations of 64 KiB or more with ``mmap`` and turn transparent huge pages
        off for the process (more repeatable peaks), then go back to :meth:`steady_allocator`'s settings and huge
        pages. No effect on CUDA.

        Yields:
            Nothing.
        """
        if self.device.type != "cpu" or not self.available:
            yield
            return
        self._mallopt(64 * 2 ** 10)
        self._transparent_huge_pages(False)
        try:
            yield
        finally:
            self._transparent_huge_pages(True)
            self.steady_allocator()

    @staticmethod
    def _transparent_huge_pages(enabled: bool) -> None:
        """Linux ``prctl(PR_SET_THP_DISABLE)``: without transparent huge pages, resident memory grows by 4 KiB pages
        as it is touched instead of 2 MiB at a time (and khugepaged does not collapse pages in the background)."""
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_THP_DISABLE, 0 if enabled else 1, 0, 0, 0)

    def start(self) -> None:
        """Mark the start of a region: reset the peak to the current use."""
        if not self.available:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        self._malloc_trim()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        self._baseline = self._status("VmRSS") or 0

    def growth(self) -> int | None:
        """Peak memory since :meth:`start` above the use at :meth:`start`, in bytes (None when unavailable).

        Returns:
            The growth in bytes, or None.
        """
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._baseline)
        peak = self._status("VmHWM")
        return None if peak is None else max(0, peak - self._baseline)


# ------------------------------------------------------------------------------------------------ inputs
def materialize(inputs: Inputs, spec: FamilySpec, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> Inputs:
    """Real tensors of the shapes of :func:`nagkit.bench.families.build_inputs`'s meta inputs.

    Float tensors are standard normal (seeded), timesteps mid-schedule (500, Flux and Chroma 0.5; Flux guidance 3.5),
    text masks ones with the last quarter of the text tokens padded (a prompt shorter than the encoder's length;
    Chroma's float ``[text | image]`` mask keeps its image part at one; boolean masks, Krea 2's, stay boolean).

    Args:
        inputs: meta inputs (and negative) of one call.
        spec: the family (Flux timesteps are fractions).
        device: target device.
        dtype: float dtype of the embeddings and latents.
        generator: CPU generator for the random values.

    Returns:
        A new :class:`Inputs` on ``device``.
    """

    g = spec.geometry

    def real(key: str, x: Any) -> Any:
        if isinstance(x, dict):
            return {k: real(k, v) for k, v in x.items()}
        if isinstance(x, list):  # per-sample lists (Z-Image's latents and captions)
            return [real(key, v) for v in x]
        if not isinstance(x, torch.Tensor):
            return x
        if key in inputs.real:  # values the family built for real (a token layout)
            return x.to(device)
        if x.dtype in (torch.long, torch.bool) or (spec.inputs == "chroma" and key == "attention_mask"):
            joint = spec.inputs == "chroma" and x.shape[-1] == g.text_tokens + g.image_query_tokens
            text = g.text_tokens if joint else x.shape[-1]
            mask = torch.ones(x.shape, dtype=x.dtype if x.dtype in (torch.long, torch.bool) else dtype)
            mask[..., text - text // 4: text] = 0
            return mask.to(device)
        if key in ("timestep", _adapter(spec).timestep_arg):  # Z-Image: "t"
            return torch.full(x.shape, _adapter(spec).timestep_max / 2, device=device)  # mid-schedule
        if key == "guidance":
            return torch.full(x.shape, 3.5, device=device)
        return torch.randn(x.shape, generator=generator).to(device=device, dtype=dtype)

    return Inputs(kwargs=real("", inputs.kwargs), text_arg=inputs.text_arg, mask_arg=inputs.mask_arg,
                  negative=real("", inputs.negative), real=inputs.real)


def build_timing_model(spec: FamilySpec, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The family's denoiser with real random weights (diffusers' own initialisation after ``torch.manual_seed``).

    Args:
        spec: the (reduced) family.
        device: where to build it.
        dtype: parameter dtype.
        seed: the seed.

    Returns:
        The model in eval mode.
    """
    import diffusers

    torch.manual_seed(seed)
    cls = getattr(diffusers, spec.model_class)
    with _quiet_diffusers(), torch.device(device):
        model = cls.from_config(spec.config)
        model = model.to(dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Call:
    """One denoiser forward of a variant.

    Attributes:
        kwargs: the forward's keyword arguments.
        context: factory of the context entered around the call, outside the timed region (installs NAG or the
            reference processors); it yields the ``Guide`` when the call must be guided, else anything.
        guided: check after the call that NAG guided it exactly once.
    """

    kwargs: dict[str, Any]
    context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    guided: bool = False


@contextlib.contextmanager
def nag_context(model: torch.nn.Module, negative: dict[str, torch.Tensor], mode: str = "fast",
                two_attentions: bool = False) -> Iterator[Any]:
    """``nagkit.apply(model, negative=..., mode=mode)``, optionally inside ``force_two_attentions()``.

    Args:
        model: the denoiser.
        negative: the negative's forward arguments.
        mode: nagkit's mode.
        two_attentions: compute ``Z+``/``Z-`` as two full joint attentions (the official way).

    Yields:
        The ``Guide``; NAG is removed on exit.
    """
    import nagkit

    from ..kernels.joint import force_two_attentions

    with nagkit.apply(model, negative=negative, mode=mode) as guide, \
            force_two_attentions() if two_attentions else contextlib.nullcontext():
        yield guide


def variant_calls(model: torch.nn.Module, spec: FamilySpec, inputs: Inputs, cfg_inputs: Inputs
                  ) -> dict[str, list[Call]]:
    """The calls of every time-mode variant (see the module docstring).

    Args:
        model: the denoiser.
        spec: the family.
        inputs: real inputs of batch B (and the negative).
        cfg_inputs: real inputs of batch 2B.

    Returns:
        ``{variant: [Call, ...]}`` in :data:`TIME_VARIANTS` order.
    """
    g = spec.geometry
    neg = inputs.negative

    def guided(mode: str = "fast", two: bool = False) -> Callable[[], AbstractContextManager[Any]]:
        return lambda: nag_context(model, neg, mode, two)

    reference = OFFICIAL_WAY.get(spec.inputs)
    if spec.attention == "cross":
        layout = OfficialLayout(lp=g.text_tokens, ln=g.negative_length, image_tokens=g.image_tokens)
        official = Call(packed_kwargs(inputs), lambda: official_processors(model, layout))
    elif reference is not None:
        layout = OfficialLayout(lp=g.text_tokens, ln=g.negative_length)
        official = Call(inputs.kwargs, lambda: reference(model, neg, layout))
    else:
        # a family without an official implementation (HiDream): its fast mode with two full attentions per layer
        official = Call(inputs.kwargs, guided("official" if _adapter(spec).official else "fast", True), guided=True)
    return {
        "none": [Call(inputs.kwargs)],
        "cfg": [Call(inputs.kwargs)] * 2 if separate_cfg(spec) else [Call(cfg_inputs.kwargs)],
        "nag": [Call(inputs.kwargs, guided(), guided=True)],
        "official": [official],
        "nag+cfg": [Call(inputs.kwargs), Call(inputs.kwargs, guided(), guided=True)],
    }


def prime_calls(plans: dict[str, list[Call]]) -> list[Call]:
    """The calls that install something around the forward (NAG, the reference processors), from every variant:
    what :func:`time_family` runs once, untimed, before its rounds, so that one-time work on a first guided call
    (the compiled NAG combination compiling, lazy caches) lands in no timed round and no memory measurement.

    Args:
        plans: the variants' calls (:func:`variant_calls`).

    Returns:
        The calls, in variant order.
    """
    return [call for calls in plans.values() for call in calls if call.context is not contextlib.nullcontext]


def _forward(model: torch.nn.Module, kwargs: dict[str, Any], device: torch.device) -> tuple[Any, float]:
    """One forward and its wall time in seconds (CUDA: between two CUDA events)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = model(**kwargs)
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1000
    started = time.perf_counter()
    out = model(**kwargs)
    return out, time.perf_counter() - started


def run_variant(model: torch.nn.Module, calls: list[Call], device: torch.device,
                memory: PeakMemory | None = None) -> tuple[float, int | None]:
    """Run a variant's calls; time only the forwards.

    Args:
        model: the denoiser.
        calls: the variant's calls (outputs are kept until the variant ends, as a pipeline keeps the
            unconditional prediction while the conditional one runs).
        device: the device.
        memory: measure the peak memory growth over the whole variant.

    Returns:
        ``(seconds, peak growth in bytes or None)``.

    Raises:
        RuntimeError: when a call that should be guided was not.
    """
    outputs = []
    total = 0.0
    if memory is not None:
        memory.start()
    with torch.no_grad():
        for call in calls:
            with call.context() as guide:
                out, seconds = _forward(model, call.kwargs, device)
                if call.guided:
                    counts = dict(getattr(guide.state, "calls", None) or {})
                    if counts and counts.get("guided", 0) != 1:
                        raise RuntimeError(f"the forward was not guided ({counts})")
            outputs.append(out)
            total += seconds
    growth = memory.growth() if memory is not None else None
    del outputs
    return total, growth


# ------------------------------------------------------------------------------------------------ results
@dataclass
class TimeVariant:
    """One variant of one family in time mode.

    Attributes:
        seconds: wall time of each timed round.
        median_s: median of ``seconds``.
        overhead: median over rounds of ``time / time(none) − 1`` in the same round (None when not run).
        overhead_range: smallest and largest per-round overhead.
        flops: FLOPs of the variant on the same reduced config (meta device).
        flop_overhead: ``flops / flops(none) − 1``.
        peak_bytes: peak memory growth during the variant (see :class:`PeakMemory`).
        peak_ratio: ``peak_bytes / peak_bytes(none)``.
        calls: denoiser forwards per variant.
        note: how it runs, or why it did not.
    """

    seconds: list[float] = field(default_factory=list)
    median_s: float | None = None
    overhead: float | None = None
    overhead_range: tuple[float, float] | None = None
    flops: int | None = None
    flop_overhead: float | None = None
    peak_bytes: int | None = None
    peak_ratio: float | None = None
    calls: int = 1
    note: str = ""


@dataclass
class FamilyTime:
    """Everything time mode measured for one family.

    Attributes:
        family, title, model_class, attention: as in FLOP mode.
        params: parameters of the reduced model.
        reductions: what differs from the published config (one line each).
        geometry: the reduced call geometry.
        variants: ``{variant: TimeVariant}`` for :data:`TIME_VARIANTS`.
        notes: remarks (failures).
        seconds: wall time spent on the family (build, counting, all rounds).
    """

    family: str
    title: str
    model_class: str
    attention: str
    params: int
    reductions: list[str]
    geometry: dict[str, Any]
    variants: dict[str, TimeVariant] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times in seconds, memory in bytes, overheads as fractions)."""
        return asdict(self)


def guided_flops(model: torch.nn.Module, call: Call) -> int:
    """FLOPs of one guided call on the real inputs (not meta): on families with a text mask, what nagkit does with
    the mask's values (it drops the negative's padded tokens) shows only there.

    Args:
        model: the denoiser with real weights.
        call: the guided call (its context installs NAG).

    Returns:
        The FLOPs.
    """
    with call.context():
        return count_flops(lambda: model(**call.kwargs))


def valid_negative_tokens(spec: FamilySpec) -> int:
    """The negative tokens nagkit computes in time mode: :func:`materialize` pads the last quarter of every text mask
    (a prompt shorter than the encoder's length), and on families where nagkit drops a negative's padding
    (:func:`nagkit.bench.flops.drops_padding`: PixArt, Sana) three quarters remain; elsewhere all of them.

    Args:
        spec: the (reduced) family.

    Returns:
        The number of valid negative tokens.
    """
    n = spec.geometry.negative_length
    return n - n // 4 if drops_padding(spec) else n


def time_flops(spec: FamilySpec) -> dict[str, int | None]:
    """FLOPs of every time-mode variant on the family's config, counted on the meta device as in FLOP mode (only
    the variants time mode runs: faster than :func:`nagkit.bench.flops.run_family`). ``cfg`` is twice ``none``
    (one call of batch 2B or two of batch B: FLOP mode counts the batched call at exactly +100 % on every family)
    and ``nag+cfg`` is ``none + nag``. Where nagkit drops a masked negative's padding, ``nag`` is counted for the
    negative's valid tokens (:func:`valid_negative_tokens`; the official way computes all of them), and
    :func:`time_family` recounts it on the real inputs (:func:`guided_flops`).

    Args:
        spec: the (reduced) family.

    Returns:
        ``{variant: FLOPs or None}`` for :data:`TIME_VARIANTS`.
    """
    model = build_model(spec)
    inputs = build_inputs(spec)
    none = count_flops(lambda: model(**inputs.kwargs))
    g = spec.geometry
    valid = valid_negative_tokens(spec)  # nagkit drops the masked negative's padding (meta masks have no values)
    nag_inputs = inputs if valid == g.negative_length else build_inputs(spec.with_geometry(negative_tokens=valid))
    nag, _ = count_guided(model, nag_inputs, "fast")
    reference = OFFICIAL_WAY.get(spec.inputs)
    if spec.attention == "cross":
        layout = OfficialLayout(lp=g.text_tokens, ln=g.negative_length, image_tokens=g.image_tokens)
        packed = packed_kwargs(inputs)
        with official_processors(model, layout):
            official: int | None = count_flops(lambda: model(**packed))
    elif reference is not None:
        with reference(model, inputs.negative, OfficialLayout(lp=g.text_tokens, ln=g.negative_length)):
            official = count_flops(lambda: model(**inputs.kwargs))
    else:
        way = "official" if _adapter(spec).official else "fast"  # no official implementation: fast, two attentions
        official, _ = count_guided(model, inputs, way, two_attentions=True)
    return {"none": none, "cfg": 2 * none, "nag": nag, "official": official,
            "nag+cfg": None if nag is None else none + nag}


def reduce_for_time(spec: FamilySpec, **geometry: Any) -> tuple[FamilySpec, list[str]]:
    """The family's reduced time-mode config, with optional geometry changes on top.

    Args:
        spec: a published family (its ``time`` object gives the reduction).
        **geometry: :class:`nagkit.bench.families.Geometry` fields to change afterwards (None values ignored).

    Returns:
        ``(reduced spec, reductions)``, the changes listed as in
        :meth:`nagkit.bench.families.FamilySpec.for_time`, plus a line for the given geometry.

    Raises:
        ValueError: when the resulting geometry is invalid.
    """
    reduced, lines = spec.for_time()
    given = {k: v for k, v in geometry.items() if v is not None}
    if given:
        reduced = reduced.with_geometry(**given)
        lines = [*(line for line in lines if line != "none"),
                 "command line: " + ", ".join(f"{k}={v}" for k, v in given.items())]
    reduced.geometry.validate()
    return reduced, lines


def combine_mode(device: torch.device) -> str:
    """How nagkit's NAG combination ran in this process on ``device``: ``"compiled"`` (``torch.compile``, inductor),
    or ``"eager (...)"`` with the reason.

    Args:
        device: the benchmark device.

    Returns:
        A short description for the report.
    """
    from ..core.operator import compile_status

    status = compile_status()
    if not status["enabled"]:
        return "eager (NAGKIT_COMPILE=0)"
    if device.type in status["failed"]:
        return f"eager (compiling failed: {status['failed'][device.type]})"
    return "compiled (torch.compile, inductor)" if status["variants"] else "eager"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def time_family(spec: FamilySpec, reductions: list[str], device: torch.device, dtype: torch.dtype = torch.float32,
                repeats: int = 4, warmup: int = 1, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> FamilyTime:
    """Time every variant of one (reduced) family.

    Args:
        spec: the family as it is run (already reduced, see :func:`reduce_for_time`).
        reductions: what was reduced, for the report.
        device: ``cpu`` or a CUDA device.
        dtype: parameter and activation dtype.
        repeats: timed rounds (the median is reported).
        warmup: untimed rounds first (the first one also measures peak memory).
        seed: seed of the weights and inputs.
        progress: optional callback receiving progress lines.

    Returns:
        The :class:`FamilyTime`.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    g = spec.geometry
    g.validate()
    counted_flops = time_flops(spec)
    model = build_timing_model(spec, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = materialize(build_inputs(spec, dtype=dtype), spec, device, dtype, generator)
    cfg_inputs = materialize(build_inputs(spec, batch=2 * g.batch, dtype=dtype), spec, device, dtype, generator)
    geometry = {"height": g.height, "width": g.width, "frames": g.frames, "image_tokens": g.image_query_tokens,
                "text_tokens": g.text_tokens, "negative_tokens": g.negative_length,
                "negative_valid_tokens": valid_negative_tokens(spec),
                "image_context_tokens": g.image_tokens, "batch": g.batch}
    result = FamilyTime(family=spec.name, title=spec.title, model_class=spec.model_class, attention=spec.attention,
                        params=parameter_count(model), reductions=reductions, geometry=geometry)
    plans = variant_calls(model, spec, inputs, cfg_inputs)
    if g.mask and counted_flops["nag"] is not None:  # what nagkit computes with these mask values (its padding)
        counted_flops["nag"] = guided_flops(model, plans["nag"][0])
        counted_flops["nag+cfg"] = counted_flops["none"] + counted_flops["nag"]
    base_flops = counted_flops["none"]
    for name, calls in plans.items():
        counted = counted_flops[name]
        result.variants[name] = TimeVariant(
            flops=counted, calls=len(calls),
            flop_overhead=None if counted is None or not base_flops else counted / base_flops - 1)

    active = list(TIME_VARIANTS)
    memory = PeakMemory(device)
    # one-time work is billed to nobody: the model's first forward, and every variant that installs something once
    # (nagkit's compiled NAG combination compiles on its first guided call), before the first round — also before
    # the memory round, whose peaks would otherwise hold the compiler's allocations
    run_variant(model, plans["none"], device)
    for call in prime_calls(plans):
        try:
            run_variant(model, [call], device)
        except Exception:  # noqa: BLE001, S110 - a failing variant is reported by the rounds, which run it again
            pass
    rounds = warmup + repeats + (0 if warmup else 1)
    for r in range(rounds):
        timed = warmup <= r < warmup + repeats
        measure = r == (0 if warmup else rounds - 1)  # peak memory in the first warm-up round, else a last round
        shift = r % len(active)
        with memory.precise() if measure else contextlib.nullcontext():
            if measure:  # one plain forward first: the allocator's switch (and the first forward) is billed to nobody
                run_variant(model, plans["none"], device)
            for name in active[shift:] + active[:shift]:
                if name not in active:
                    continue
                try:
                    seconds, peak = run_variant(model, plans[name], device, memory if measure else None)
                except Exception as err:  # noqa: BLE001 - a failing variant is reported, the others still run
                    if name == "none":
                        raise
                    why = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    result.variants[name].note = why
                    result.notes.append(f"{name} {why}")
                    active.remove(name)
                    continue
                if timed:
                    result.variants[name].seconds.append(seconds)
                if measure:
                    result.variants[name].peak_bytes = peak
        say(f"  {spec.name:<15} round {r + 1}/{rounds}" + ("" if timed else " (untimed)"))

    none = result.variants["none"]
    for name in active:
        v = result.variants[name]
        v.median_s = _median(v.seconds)
        ratios = [t / b - 1 for t, b in zip(v.seconds, none.seconds, strict=True)]
        v.overhead = _median(ratios)
        v.overhead_range = (min(ratios), max(ratios))
        if v.peak_bytes is not None and none.peak_bytes:
            v.peak_ratio = v.peak_bytes / none.peak_bytes
        say(f"  {spec.name:<15} {name:<9} {v.median_s * 1000:9.1f} ms  {v.overhead * 100:+7.1f}%  "
            f"(FLOPs {_fmt(v.flop_overhead)})")
    del model
    gc.collect()
    result.seconds = time.perf_counter() - started
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def run_time(specs: list[tuple[FamilySpec, list[str]]], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, repeats: int = 4, warmup: int = 1, seed: int = 0,
             progress: Callable[[str], None] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run time mode on several families.

    Args:
        specs: ``(reduced spec, reductions)`` pairs, e.g. from :func:`reduce_for_time`.
        device: ``"cpu"`` or ``"cuda"`` (the CUDA path — events and ``max_memory_allocated`` — is untested).
        dtype: parameter and activation dtype (float32 by default: CPUs without AVX-512-BF16/AMX run bf16 matmuls
            far slower than fp32).
        repeats: timed rounds per family (the median is reported).
        warmup: untimed rounds first.
        seed: seed of the weights and inputs.
        progress: optional callback receiving progress lines.
        threads: torch's intra-op threads during the run (None: as set; restored afterwards). One thread makes the
            ratios robust on a machine shared with other work: a multi-threaded op waits for all its threads, and
            with fewer free cores than threads every small op can stall for a scheduler time slice.

    Returns:
        A JSON-ready report: ``{"mode": "time", "versions", "machine", "settings", "families", "seconds"}``.

    Raises:
        ValueError: for fewer than one repeat or a negative warm-up.
        RuntimeError: when CUDA is asked for but not available.
    """
    import diffusers

    import nagkit

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if threads is not None and threads < 1:
        raise ValueError("threads must be >= 1")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"time mode runs on cpu or cuda, not {device.type}")
    started = time.perf_counter()
    flush = device.type == "cpu" and torch.set_flush_denormal(True)  # denormals would slow fp32 CPU math
    steady = device.type == "cpu" and PeakMemory.steady_allocator()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = []
        for spec, reductions in specs:
            if progress:
                progress(f"{spec.title} ({spec.model_class}, reduced) ...")
            results.append(time_family(spec, reductions, device, dtype, repeats, warmup, seed, progress))
        machine = machine_info(device)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)
    memory = PeakMemory(device)
    return {
        "mode": "time",
        "versions": {"nagkit": nagkit.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "machine": machine,
        "settings": {"dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "warmup": warmup, "seed": seed,
                     "nag_combine": combine_mode(device), "threads": threads,
                     "flush_denormal": bool(flush), "glibc_thresholds_fixed": bool(steady),
                     "memory": ("cuda max_memory_allocated" if device.type == "cuda" else
                                "peak RSS growth (clear_refs)" if memory.available else "unavailable")},
        "families": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - started,
    }
