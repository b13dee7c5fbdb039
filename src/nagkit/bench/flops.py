"""FLOP mode of ``nagkit bench``: exact FLOPs of negative guidance on full-size denoisers, without weights.

Every variant is one or more denoiser forwards of a meta-device model (bf16) counted with
``torch.utils.flop_counter.FlopCounterMode``. Only matmuls, convolutions and attention are counted (elementwise work —
norms, softmax, the NAG combination — is invisible to the counter and is O(L·C), negligible next to O(L·C²)).

Variants (``B`` = prompts per call):

* ``none``: one conditional forward, batch B (the base every overhead is relative to);
* ``cfg``: classifier-free guidance, one forward of batch 2B (unconditional + conditional);
* ``nag``: nagkit's NAG, ``nagkit.apply(model, negative={...})`` (default ``mode="fast"``), one forward of batch B;
* ``nag-official``: nagkit's ``mode="official"`` (with its default log-sum-exp sharing of the double blocks'
  image→image attention): differs from ``nag`` on Flux only (single blocks carry a second image copy); n/a on
  Chroma, where nagkit refuses it (no official implementation to reproduce);
* ``nag+cfg``: NAG on the conditional branch of CFG, counted as two separate forwards: the unconditional rows plain
  (``none``) plus the conditional rows guided (``nag``) — nagkit's batched ``[uncond, cond]`` path also carries the
  negative's K/V projections on the unconditional rows (zero tokens), which this count leaves out;
* ``official``: the official implementation's computation. Cross-attention families: the in-repo reference
  (:mod:`nagkit.bench.reference`), image queries tiled for the negative text batch. Joint-attention families:
  ``nagkit.apply(model, negative=..., mode="official")`` inside :func:`nagkit.kernels.joint.force_two_attentions`,
  i.e. two full joint attentions per block (image→image computed twice) plus the negative text stream, and on Flux
  the single blocks on a doubled batch — the official diffusers pipelines' computation. Chroma (no official
  implementation): the in-repo reference of ComfyUI-NAG's Chroma code (:data:`nagkit.bench.reference.OFFICIAL_WAY`),
  which is the same FLUX way;
* ``min``: the analytic minimum of any NAG implementation: the negative's per-token text layers, and in every
  text cross-attention the negative's key/value projections plus the image-query × negative-key attention.
* ``nasa``, ``vsf``: the experimental competing methods on nagkit's mechanism,
  ``nagkit.apply(model, negative=..., method=...)`` (one forward of batch B); ``vsf`` is n/a on families outside
  :data:`nagkit.integration.guide.VSF_FAMILIES`.

Short negatives (families whose padded negatives nagkit shortens, :func:`drops_padding`: PixArt, Sana). A pipeline
pads the negative to the text encoder's length (300 tokens on Sana) and marks the padding in the mask; nagkit drops
the padded tokens before the denoiser (exact there: padded keys get no attention weight), so a few-word negative
costs only its valid tokens. Meta tensors have no mask values, so this is counted with the negative built at its
valid length (:data:`SHORT_NEGATIVE_TOKENS`), next to the every-token count of the ``nag`` column
(:class:`ShortNegative`); :data:`SHORT_NEGATIVE_TARGETS` holds the targets.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from .families import FamilySpec, Inputs, build_inputs, build_model, parameter_count
from .reference import OFFICIAL_WAY, OfficialLayout, official_processors, text_cross_attention_modules

VARIANTS = ("none", "cfg", "nag", "nag-official", "nag+cfg", "official", "min", "nasa", "vsf")
#: The experimental methods counted as variants (``NAGConfig.method``).
METHOD_VARIANTS = ("nasa", "vsf")
#: Valid tokens of the realistic short negative counted where nagkit drops padding (a few words: "blurry, low quality").
SHORT_NEGATIVE_TOKENS = 8
#: Largest NAG FLOP overhead allowed with the short negative, per family (issue 12: Sana-1.6B at 1024², ≤ +1 %).
SHORT_NEGATIVE_TARGETS = {"sana-1.6b": 0.01}
NOT_SUPPORTED = "NAG: not supported yet"
FAILED = "NAG failed"
NOT_APPLICABLE = "n/a"  # a variant that does not exist for the family (e.g. nagkit's mode="official" on Chroma)


def ensure_cpu_attention_formula() -> None:
    """Register a FLOP formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (torch has none).

    ``F.scaled_dot_product_attention`` on the meta device decomposes into two ``bmm`` (counted), but the CPU flash
    kernel — which real CPU tensors use, and which nagkit's LSE attention calls explicitly, on meta too — counts 0
    without a formula. Registering it counts that kernel once as ``4·B·H·Lq·Lk·D``; the decomposed path never calls
    it, so no attention is counted twice (:func:`attention_count_check` verifies both paths). Idempotent.
    """
    target = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if target in flop_registry:
        return

    @register_flop_formula(target)
    def _cpu_flash_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (run under ``torch.no_grad``).

    Args:
        fn: the computation, typically a denoiser forward on meta tensors.

    Returns:
        Total FLOPs (a multiply-add counts 2).
    """
    ensure_cpu_attention_formula()
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def attention_count_check(device: str = "meta") -> tuple[int, int]:
    """Count one SDPA call (with a mask) on ``device`` and return ``(counted, expected)`` with the exact formula.

    Args:
        device: ``"meta"`` (decomposed math path) or ``"cpu"`` (the CPU flash kernel).

    Returns:
        ``(counted FLOPs, 4·B·H·Lq·Lk·D)``; equal when attention is counted exactly once.
    """
    b, h, lq, lk, d = 2, 3, 16, 8, 4
    q = torch.zeros(b, h, lq, d, device=device)
    k = torch.zeros(b, h, lk, d, device=device)
    mask = torch.zeros(b, 1, lq, lk, device=device)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    return flops, 4 * b * h * lq * lk * d


@dataclass
class VariantResult:
    """One variant of one family.

    Attributes:
        flops: FLOPs of the variant (None when not available).
        overhead: ``flops / none − 1`` (None when not available).
        note: why it is missing, or how it was counted.
    """

    flops: int | None = None
    overhead: float | None = None
    note: str = ""


@dataclass
class ShortNegative:
    """NAG with a short negative on a masked family, next to the negative padded to the text length.

    Attributes:
        tokens: valid tokens of the short negative.
        padded_tokens: the padded length (the ``nag`` column's negative).
        nag_padded: nagkit's overhead with the padded negative (the ``nag`` column; every token counted).
        nag: nagkit's overhead with the short negative (its valid tokens only).
        nag_flops: FLOPs of that guided forward.
        min: the analytic minimum with the short negative (as the ``min`` column).
        target: the family's target for ``nag`` (:data:`SHORT_NEGATIVE_TARGETS`), or None.
        note: why a number is missing.
    """

    tokens: int
    padded_tokens: int
    nag_padded: float | None = None
    nag: float | None = None
    nag_flops: int | None = None
    min: float | None = None
    target: float | None = None
    note: str = ""

    @property
    def meets_target(self) -> bool | None:
        """Whether ``nag`` is within ``target`` (None without a target or a count)."""
        if self.target is None or self.nag is None:
            return None
        return self.nag <= self.target


@dataclass
class FamilyResult:
    """Everything measured for one family.

    Attributes:
        family: short name.
        title: report name.
        model_class: diffusers class.
        attention: ``cross`` or ``joint``.
        params: parameter count.
        geometry: the call geometry (resolution, frames, tokens, batch).
        variants: ``{variant: VariantResult}`` for :data:`VARIANTS`.
        nag_supported: whether ``nagkit.apply`` accepts the denoiser.
        nag_minus_min: nagkit's overhead minus the analytic minimum, as a fraction of ``none`` (None if unknown).
        min_check_flops: extra FLOPs of one forward with the negative tokens appended to the prompt's
            (cross-attention only): the minimum measured, equal to the analytic one when both are right.
        official_check_flops: joint attention only: ``official − <official_check_base>`` as predicted: the
            image→image attention that log-sum-exp sharing saves (:func:`shared_image_attention_flops`), plus on
            Chroma the single blocks' work on the negative row's image copy (:func:`image_copy_flops`); or None.
        official_check_base: the variant ``official_check_flops`` is relative to: ``nag-official``, or ``nag`` where
            nagkit has no official mode (Chroma).
        short_negative: NAG with a short negative (:class:`ShortNegative`) where nagkit drops padding, else None.
        notes: remarks for the report.
        seconds: wall time of the counting.
    """

    family: str
    title: str
    model_class: str
    attention: str
    params: int
    geometry: dict[str, Any]
    variants: dict[str, VariantResult] = field(default_factory=dict)
    nag_supported: bool = False
    nag_minus_min: float | None = None
    min_check_flops: int | None = None
    official_check_flops: int | None = None
    official_check_base: str | None = None
    short_negative: ShortNegative | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def base_flops(self) -> int:
        """FLOPs of the ``none`` variant."""
        return int(self.variants["none"].flops or 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (FLOPs as integers, overheads as fractions)."""
        data = asdict(self)
        data["base_tflops"] = self.base_flops / 1e12
        return data


@dataclass
class _AttnShape:
    lq: int
    c_ctx: int
    k_out: int
    v_out: int


@contextlib.contextmanager
def _record_cross_attention(model: torch.nn.Module) -> Iterator[dict[str, _AttnShape]]:
    """Record the image-query length of every text cross-attention during a forward."""
    shapes: dict[str, _AttnShape] = {}
    handles = []
    for name, module in text_cross_attention_modules(model).items():
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            lq = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[-1] * hidden.shape[-2]
            shapes[name] = _AttnShape(lq=int(lq), c_ctx=mod.to_k.in_features, k_out=mod.to_k.out_features,
                                      v_out=mod.to_v.out_features)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def analytic_minimum(model: torch.nn.Module, spec: FamilySpec, shapes: dict[str, _AttnShape]) -> int:
    """The least extra work any NAG implementation does for a cross-attention family, in FLOPs.

    For every guided row: the per-token text layers on the negative's ``Ln`` tokens (``spec.text_modules``, counted
    by running them on a meta tensor), and in each text cross-attention the negative's key/value projections
    ``2·Ln·C_ctx·(C_k + C_v)`` plus the image-query × negative-key attention ``2·Lq·Ln·(C_k + C_v)``.

    Args:
        model: the meta model.
        spec: the family (geometry and text modules).
        shapes: per-module query lengths recorded during the base forward.

    Returns:
        Extra FLOPs over the base forward.
    """
    g = spec.geometry
    rows, ln = g.batch, g.negative_length
    total = 0
    for name in spec.text_modules:
        module = model.get_submodule(name)
        x = torch.empty(rows, ln, g.text_dim, device="meta", dtype=next(module.parameters()).dtype)
        total += count_flops(lambda module=module, x=x: module(x))
    for shape in shapes.values():
        total += rows * 2 * ln * (shape.k_out + shape.v_out) * (shape.c_ctx + shape.lq)
    return total


def attention_width(module: torch.nn.Module) -> int:
    """The query width (heads × head dim) of an attention module: ``to_q.out_features``, or ``inner_dim`` for
    attentions with a fused projection and no ``to_q`` (FLUX.2's ``Flux2ParallelSelfAttention``)."""
    to_q = getattr(module, "to_q", None)
    return to_q.out_features if to_q is not None else module.inner_dim


def joint_minimum(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The least extra work of NAG on a joint-attention (MM-DiT) family, in FLOPs.

    The negative text is a stream of its own (the official joint-attention NAG): each of its ``Ln`` tokens goes
    through every text linear layer (``spec.text_linears``: ``2·C_in·C_out`` per token), and in each joint attention
    its queries attend to ``[negative text, image]`` while the image queries attend to the negative's keys once more
    (the image→image and image→prompt attention are not repeated): ``4·C·Ln·(Ln + 2·Li)`` with ``C`` the attention
    width and ``Li`` the image tokens. Pre-block text work that such patterns cannot describe comes from the family's
    ``Adapter.bench_text_flops`` (Krea 2's text fusion).

    Args:
        model: the meta model.
        spec: the family (geometry and module patterns).

    Returns:
        Extra FLOPs over the base forward.
    """
    from ..adapters.base import find_adapter

    g = spec.geometry
    rows, ln, li = g.batch, g.negative_length, g.image_query_tokens
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _matches(name, spec.text_linears):
            total += rows * ln * 2 * module.in_features * module.out_features
        elif _matches(name, spec.joint_attention):
            width = attention_width(module)
            total += rows * 4 * width * ln * (ln + 2 * li)
    adapter = find_adapter(model)
    if adapter is not None and adapter.bench_text_flops is not None:
        total += adapter.bench_text_flops(model, spec)
    return total


def shared_image_attention_flops(model: torch.nn.Module, spec: FamilySpec, single_blocks: bool = False) -> int:
    """FLOPs of the image→image attention that the official way computes a second time, for the ``Z-`` branch.

    In every joint attention with a text stream of its own (``add_q_proj``: SD3 blocks, Flux double blocks) the
    official code runs two full joint attentions, so the image queries attend to the image keys twice; nagkit's
    log-sum-exp path computes that part once: ``4·B·C·Li²`` per module (``C`` the attention width, ``Li`` the image
    tokens). Flux single blocks are not included by default: nagkit's official mode runs them on the doubled batch
    too. Chroma (``single_blocks=True``): nagkit's fast mode shares the image→image attention in the single blocks as
    well, and the official way computes it once per row.

    Args:
        model: the meta model.
        spec: the family (geometry and the ``joint_attention`` patterns).
        single_blocks: also count the joint attentions without a text stream of their own (single blocks).

    Returns:
        ``official − nag-official`` (``official − nag`` on Chroma, with :func:`image_copy_flops`) in FLOPs, as it
        should be counted.
    """
    g = spec.geometry
    li = g.image_query_tokens
    total = 0
    for name, module in model.named_modules():
        if _matches(name, spec.joint_attention) and (single_blocks or getattr(module, "add_q_proj", None) is not None):
            total += g.batch * 4 * attention_width(module) * li * li
    return total


def image_copy_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """FLOPs of the single blocks' per-token layers on the image copy that the official FLUX way (and ComfyUI-NAG's
    Chroma code) puts in the negative row: ``2·B·Li·C_in·C_out`` for every linear layer of a single block that every
    token goes through (the ``single_transformer_blocks.*`` patterns of ``spec.text_linears``: q/k/v projections,
    MLP in, output projection). The attention of the copy costs what nagkit's ``Z-`` costs, so it is not included.

    Args:
        model: the meta model.
        spec: the family (geometry and the ``text_linears`` patterns).

    Returns:
        The extra FLOPs of the image copy.
    """
    g = spec.geometry
    patterns = tuple(p for p in spec.text_linears if p.startswith("single_transformer_blocks."))
    return sum(g.batch * g.image_query_tokens * 2 * module.in_features * module.out_features
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and _matches(name, patterns))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def packed_kwargs(inputs: Inputs) -> dict[str, Any]:
    """Forward kwargs with the negative appended to the prompt's text tokens (and mask): ``[positive | negative]``.

    Args:
        inputs: the call's inputs and the negative (batch 1 or the call's batch).

    Returns:
        The kwargs for ``model(**kwargs)``.
    """
    text = inputs.kwargs[inputs.text_arg]
    neg = inputs.negative["encoder_hidden_states"].expand(text.shape[0], -1, -1)
    mask = None
    if inputs.mask_arg is not None and inputs.mask_arg in inputs.kwargs:
        neg_mask = inputs.negative[inputs.mask_arg].expand(text.shape[0], -1)
        mask = torch.cat([inputs.kwargs[inputs.mask_arg], neg_mask], dim=1)
    return inputs.with_text(torch.cat([text, neg], dim=1), mask)


def _try_apply(model: torch.nn.Module, negative: dict[str, torch.Tensor], mode: str = "fast", method: str = "nag"
               ) -> tuple[Any | None, str]:
    import nagkit

    try:
        options = {} if method == "nag" else {"method": method}
        return nagkit.apply(model, negative=negative, mode=mode, **options), ""
    except (TypeError, NotImplementedError) as err:
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__


def count_guided(model: torch.nn.Module, inputs: Inputs, mode: str, two_attentions: bool = False,
                 method: str = "nag") -> tuple[int | None, str]:
    """FLOPs of one guided forward with ``nagkit.apply(model, negative=..., mode=mode)``, or ``(None, reason)``.

    Args:
        model: the meta model.
        inputs: the call's inputs and the negative.
        mode: nagkit's ``mode`` (``"fast"`` or ``"official"``).
        two_attentions: count inside :func:`nagkit.kernels.joint.force_two_attentions` (the official way).
        method: ``NAGConfig.method`` (``"nag"``, or the experimental ``"nasa"``/``"vsf"`` with their defaults).

    Returns:
        ``(flops, "")``, or ``(None, why)`` when NAG does not support the model or the forward failed.
    """
    from ..kernels.joint import force_two_attentions

    guide, reason = _try_apply(model, inputs.negative, mode, method)
    if guide is None:
        return None, f"{NOT_SUPPORTED} ({reason})"
    try:
        with force_two_attentions() if two_attentions else contextlib.nullcontext():
            flops = count_flops(lambda: model(**inputs.kwargs))
        calls = dict(getattr(guide.state, "calls", None) or {})
        if calls and calls.get("guided", 0) != 1:
            raise RuntimeError(f"the forward was not guided ({calls})")
    except Exception as err:  # noqa: BLE001 - a failing adapter is reported, the other families still run
        return None, f"{FAILED}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        guide.remove()
    return flops, ""


def run_family(spec: FamilySpec, progress: Callable[[str], None] | None = None,
               short_negative: int | None = SHORT_NEGATIVE_TOKENS) -> FamilyResult:
    """Count every variant of one family.

    Args:
        spec: the family and its geometry (batch, negative length included).
        progress: optional callback receiving one line per counted variant.
        short_negative: on families whose padded negatives nagkit shortens (:func:`drops_padding`), also count NAG
            with a negative of this many valid tokens (:class:`ShortNegative`); None or 0: not counted. Not counted
            either when the negative is not longer.

    Returns:
        The :class:`FamilyResult`.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    g = spec.geometry
    g.validate()
    model = build_model(spec)
    inputs = build_inputs(spec)
    geometry = {"height": g.height, "width": g.width, "frames": g.frames, "latent_frames": g.latent_frames,
                "image_tokens": g.image_query_tokens, "text_tokens": g.text_tokens,
                "negative_tokens": g.negative_length, "image_context_tokens": g.image_tokens, "batch": g.batch,
                "text_encoder": g.text_encoder}
    result = FamilyResult(family=spec.name, title=spec.title, model_class=spec.model_class, attention=spec.attention,
                          params=parameter_count(model), geometry=geometry)
    variants = result.variants

    def record(name: str, flops: int | None, note: str = "") -> None:
        base = variants["none"].flops if "none" in variants else flops
        overhead = None if flops is None or not base else flops / base - 1
        variants[name] = VariantResult(flops=flops, overhead=overhead, note=note)
        if flops is not None:
            say(f"  {spec.name:<15} {name:<12} {flops / 1e12:12.4f} TFLOPs")
        else:
            say(f"  {spec.name:<15} {name:<12} {note}")

    cross = spec.attention == "cross"
    with _record_cross_attention(model) as shapes:
        record("none", count_flops(lambda: model(**inputs.kwargs)))
    cfg_inputs = build_inputs(spec, batch=2 * g.batch)
    record("cfg", count_flops(lambda: model(**cfg_inputs.kwargs)), "one forward of batch 2B")

    reference = OFFICIAL_WAY.get(spec.inputs)  # an in-repo reference of the official way (Chroma), or None
    nag, reason = count_guided(model, inputs, "fast")
    result.nag_supported = not reason.startswith(NOT_SUPPORTED)
    if nag is None:
        short = NOT_SUPPORTED if not result.nag_supported else reason
        for name in ("nag", "nag-official", "nag+cfg"):
            record(name, None, short)
        result.notes.append(reason)
    else:
        record("nag", nag, "nagkit.apply(model, negative=...)")
        from ..adapters import adapter_for

        if not adapter_for(model).official:  # no official code to reproduce (Chroma): nagkit refuses the mode
            record("nag-official", None, f"{NOT_APPLICABLE}: nagkit refuses mode='official' for "
                                         f"{type(model).__name__} (no official NAG implementation)")
        else:
            nag_official, why = count_guided(model, inputs, "official")
            record("nag-official", nag_official, why or "nagkit.apply(model, negative=..., mode='official')")
            if why:
                result.notes.append(f"mode='official': {why}")
        record("nag+cfg", variants["none"].flops + nag, "two forwards: uncond plain + cond guided")

    count_methods(model, inputs, nag, reason, result, record)

    if cross:
        layout = OfficialLayout(lp=g.text_tokens, ln=g.negative_length, image_tokens=g.image_tokens)
        packed = packed_kwargs(inputs)
        with official_processors(model, layout):
            record("official", count_flops(lambda: model(**packed)), "in-repo reference: tiled image queries")
        minimum = analytic_minimum(model, spec, shapes)
        record("min", variants["none"].flops + minimum, "analytic")
        check = count_flops(lambda: model(**packed)) - variants["none"].flops
        result.min_check_flops = check
        if check != minimum:
            result.notes.append(f"analytic minimum {minimum} != measured concatenated-text check {check}")
    else:
        if reference is not None:
            official: int | None = None
            try:
                with reference(model, inputs.negative, OfficialLayout(lp=g.text_tokens, ln=g.negative_length)):
                    official = count_flops(lambda: model(**inputs.kwargs))
                why = ""
            except Exception as err:  # noqa: BLE001 - reported like a failing adapter
                why = f"{FAILED}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                result.notes.append(f"official way (reference): {why}")
            record("official", official, why or "in-repo reference of ComfyUI-NAG's Chroma code (the FLUX way): two "
                   "full joint attentions per double block, single blocks on a doubled batch")
            base = "nag"
            expected = shared_image_attention_flops(model, spec, single_blocks=True) + image_copy_flops(model, spec)
            explained = "the image→image attention computed twice and the single blocks' work on the image copy"
        else:
            from ..adapters import find_adapter

            adapter = find_adapter(model)
            # a family without an official implementation (Z-Image): its fast mode with two full attentions per layer
            way = "official" if adapter is None or adapter.official else "fast"
            official, why = (None, "NAG not available") if nag is None else count_guided(model, inputs, way, True)
            record("official", official, why or f"mode='{way}' + force_two_attentions(): two full joint attentions")
            base = "nag-official"
            expected = shared_image_attention_flops(model, spec)
            explained = "the image→image attention computed twice"
        if official is not None and variants[base].flops is not None and spec.joint_attention:
            result.official_check_flops, result.official_check_base = expected, base
            measured = official - variants[base].flops
            if measured != expected:
                result.notes.append(f"official − {base} = {measured} FLOPs, expected {expected} ({explained})")
        if spec.joint_attention:
            record("min", variants["none"].flops + joint_minimum(model, spec), "analytic (joint attention)")
        else:
            record("min", None, "no analytic minimum for this family")

    if variants["nag"].overhead is not None and variants["min"].overhead is not None:
        result.nag_minus_min = variants["nag"].overhead - variants["min"].overhead
    if short_negative and g.negative_length > short_negative and drops_padding(spec):
        result.short_negative = count_short_negative(model, spec, short_negative, variants, shapes)
        short = result.short_negative
        if short.note:
            result.notes.append(f"short negative ({short.tokens} tokens): {short.note}")
        say(f"  {spec.name:<15} {'nag, ' + str(short.tokens) + ' tok':<12} "
            + (f"{short.nag_flops / 1e12:12.4f} TFLOPs" if short.nag_flops is not None else short.note))
    result.seconds = time.perf_counter() - started
    return result


def count_methods(model: torch.nn.Module, inputs: Inputs, nag: int | None, reason: str, result: FamilyResult,
                  record: Callable[..., None]) -> None:
    """Count the :data:`METHOD_VARIANTS` (experimental NASA and VSF) with ``record(name, flops, note)``."""
    from ..adapters import adapter_for
    from ..integration.guide import VSF_FAMILIES

    for method in METHOD_VARIANTS:
        if nag is None:
            record(method, None, NOT_SUPPORTED if not result.nag_supported else reason)
        elif method == "vsf" and adapter_for(model).model_class.__name__ not in VSF_FAMILIES:
            record(method, None, f"{NOT_APPLICABLE}: VSF needs nagkit's joint/cross-attention kernels, which "
                                 f"{type(model).__name__}'s NAG processor does not use")
        else:
            flops, why = count_guided(model, inputs, "fast", method=method)
            record(method, flops, why or f"nagkit.apply(model, negative=..., method='{method}') (experimental)")


def drops_padding(spec: FamilySpec) -> bool:
    """Whether nagkit drops a masked negative's padded tokens on this family (``Adapter.drop_padding``: where that
    is exact — PixArt, Sana), so that a short negative padded to the text length costs only its valid tokens.

    Args:
        spec: the family.

    Returns:
        True for a family with a text mask whose nagkit adapter drops the padding.
    """
    import diffusers

    from ..adapters.base import find_adapter_class

    if not spec.geometry.mask:
        return False
    model_class = getattr(diffusers, spec.model_class, None)
    adapter = find_adapter_class(model_class) if isinstance(model_class, type) else None
    return bool(adapter is not None and adapter.drop_padding)


def count_short_negative(model: torch.nn.Module, spec: FamilySpec, tokens: int, variants: dict[str, VariantResult],
                         shapes: dict[str, _AttnShape]) -> ShortNegative:
    """NAG's overhead on a masked family with a negative of ``tokens`` valid tokens.

    nagkit drops a masked negative's padded tokens before the denoiser, so a short negative padded to the text
    length costs what the same negative built at its valid length costs; on meta tensors (no mask values) that is
    what is counted. The analytic minimum is recounted at that length.

    Args:
        model: the meta model.
        spec: the family (its geometry's negative is the padded one).
        tokens: valid tokens of the short negative.
        variants: the family's variants counted so far (``none``, ``nag``).
        shapes: per-module query lengths recorded during the base forward (cross attention).

    Returns:
        The :class:`ShortNegative`.
    """
    g = spec.geometry
    base = variants["none"].flops
    short = ShortNegative(tokens=tokens, padded_tokens=g.negative_length, nag_padded=variants["nag"].overhead,
                          target=SHORT_NEGATIVE_TARGETS.get(spec.name))
    short_spec = spec.with_geometry(negative_tokens=tokens)
    flops, why = count_guided(model, build_inputs(short_spec), "fast")
    if flops is None or not base:
        short.note = why or "no base count"
        return short
    short.nag_flops, short.nag = flops, flops / base - 1
    if spec.attention == "cross":
        short.min = analytic_minimum(model, short_spec, shapes) / base
    elif spec.joint_attention:
        short.min = joint_minimum(model, short_spec) / base
    return short


def run_flops(specs: list[FamilySpec], progress: Callable[[str], None] | None = None,
              short_negative: int | None = SHORT_NEGATIVE_TOKENS) -> dict[str, Any]:
    """Run FLOP mode on several families.

    Args:
        specs: the families (with their geometry already adjusted).
        progress: optional callback receiving progress lines.
        short_negative: valid tokens of the short negative (:func:`drops_padding` families; None or 0: not counted).

    Returns:
        A JSON-ready report: ``{"mode", "versions", "attention_check", "families": [FamilyResult.to_dict()...],
        "seconds"}``.

    Raises:
        RuntimeError: when one attention call is not counted exactly once (checked first, on meta and CPU).
    """
    import diffusers

    import nagkit

    started = time.perf_counter()
    checks = {device: attention_count_check(device) for device in ("meta", "cpu")}
    for device, (counted, expected) in checks.items():
        if counted != expected:
            raise RuntimeError(f"attention on {device} counts {counted} FLOPs, expected {expected}: FLOP counts "
                               "would be wrong with this torch version")
    results = []
    for spec in specs:
        if progress:
            progress(f"{spec.title} ({spec.model_class}) ...")
        results.append(run_family(spec, progress, short_negative))
    return {
        "mode": "flops",
        "short_negative_tokens": short_negative or None,
        "versions": {"nagkit": nagkit.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "attention_check": {device: {"counted": c, "expected": e} for device, (c, e) in checks.items()},
        "families": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - started,
    }
