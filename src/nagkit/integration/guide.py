"""``nagkit.apply``: install NAG on a diffusers pipeline or a bare denoiser, get a :class:`Guide` handle back.

What gets installed (and removed by :meth:`Guide.remove`):

* on each denoiser, one diffusers ``ModelHook`` (:mod:`nagkit.integration.hook`) that packs the negative text after
  the positive one on guided calls;
* on each text cross-attention module, a NAG processor wrapping the original one (``set_processor``);
* on a pipeline, an instance-level wrapper of ``encode_prompt`` that encodes the NAG negative with the call's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Adapter, adapter_for, nag_modules, supported_models
from ..core.config import NAGConfig, get_preset
from ..core.state import NAGState
from ..kernels.cross import Packing
from .hook import ArgAccess, NAGBlockHook, NAGDenoiserHook, install_hook, uninstall_hook
from .pipelines import PIPELINES, PipelineSpec, bind_arguments, is_pipeline, negative_arguments, pipeline_spec

_MARK = "_nagkit_guide"
NegativePrompt = str | list[str] | None


@dataclass
class _Negative:
    """The negative for the current pipeline call (or the fixed model-level negative)."""

    embeds: torch.Tensor  # (R, Ln, C)
    mask: torch.Tensor | None  # (R, Ln)
    positive: torch.Tensor | None = None  # (R, Lp, C): the call's prompt embeddings, to find the conditional rows
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the negative's pooled embedding (R, P)


def _check_negative_dict(negative: dict[str, Any], adapter: Adapter) -> _Negative:
    allowed = {adapter.text_arg, *adapter.negative_keys} | ({adapter.mask_arg} if adapter.mask_arg else set())
    unknown = set(negative) - allowed
    if unknown:
        raise ValueError(f"negative has keys {sorted(unknown)} that {adapter.model_class.__name__} NAG does not use; "
                         f"allowed keys: {sorted(allowed)}")
    embeds = negative.get(adapter.text_arg)
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"negative[{adapter.text_arg!r}] must be a (batch, tokens, channels) tensor")
    mask = negative.get(adapter.mask_arg) if adapter.mask_arg else None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != embeds.shape[:2]):
        raise ValueError(f"negative[{adapter.mask_arg!r}] must be a (batch, tokens) tensor matching "
                         f"negative[{adapter.text_arg!r}] {tuple(embeds.shape[:2])}")
    extras = {k: negative[k] for k in adapter.negative_keys if negative.get(k) is not None}
    for key, value in extras.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != embeds.shape[0]:
            raise ValueError(f"negative[{key!r}] must be a tensor with the same batch as "
                             f"negative[{adapter.text_arg!r}] ({embeds.shape[0]})")
    return _Negative(embeds=embeds, mask=mask, extras=extras)


def _timestep_value(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max())
    return float(t)


@torch.compiler.disable
def _in_window(config: NAGConfig, t: Any, adapter: Adapter) -> bool:
    return config.in_window(_timestep_value(t), adapter.timestep_max, adapter.window_floor)


@torch.compiler.disable
def _same(text: torch.Tensor, positive: torch.Tensor) -> bool:
    return text.shape == positive.shape and torch.equal(text, positive.to(device=text.device, dtype=text.dtype))


@torch.compiler.disable
def _conditional_half(text: torch.Tensor, positive: torch.Tensor | None, rows: int) -> slice:
    """Rows of a batched-CFG call that hold the prompt: the half equal to the prompt embeddings.

    diffusers' classic pipelines stack ``[unconditional, conditional]``; that order is the fallback when both or
    neither half match (e.g. a CFG negative equal to the prompt).
    """
    if positive is not None:
        pos = positive.to(device=text.device, dtype=text.dtype)
        first, second = torch.equal(text[:rows], pos), torch.equal(text[rows:], pos)
        if first and not second:
            return slice(0, rows)
    return slice(rows, 2 * rows)


class Guide:
    """Handle of an installed NAG: change settings with :meth:`update`, uninstall with :meth:`remove`.

    Also a context manager: ``with nagkit.apply(pipe, ...): ...`` removes NAG on exit (even after an exception).
    Create it with :func:`nagkit.apply`.
    """

    def __init__(self, target: Any, config: NAGConfig, negative_prompt: NegativePrompt,
                 negative: dict[str, Any] | None, negative_max_length: int | None = None) -> None:
        self.target = target
        self.negative_max_length = negative_max_length
        self.state = NAGState(config=config)
        self.spec: PipelineSpec | None = pipeline_spec(target) if is_pipeline(target) else None
        self._negative_prompt = negative_prompt
        self._negative_input = negative
        self._fixed: _Negative | None = None
        self._call: _Negative | None = None
        self._call_started = False  # a denoiser ran since the negative was encoded (a new pipeline call begins)
        self._denoisers: list[tuple[torch.nn.Module, Adapter]] = []
        self._processors: list[tuple[torch.nn.Module, Any]] = []
        self._hooks: list[tuple[torch.nn.Module, dict[str, Any]]] = []
        self._wrapped: dict[str, dict[str, Any]] = {}  # pipeline methods wrapped as instance attributes
        self._installed = False

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> NAGConfig:
        """The current settings."""
        return self.state.config

    @property
    def installed(self) -> bool:
        """False once :meth:`remove` ran."""
        return self._installed

    def update(self, negative_prompt: NegativePrompt = None, *, negative: dict[str, Any] | None = None,
               scale: float | None = None, tau: float | None = None, alpha: float | None = None,
               start: float | None = None, end: float | None = None, norm: str | None = None,
               mode: str | None = None) -> Guide:
        """Change settings; they take effect on the next call. Arguments left as None keep their value.

        Args:
            negative_prompt: new NAG negative prompt (pipelines), a string or one string per prompt.
            negative: new precomputed negative (see :func:`nagkit.apply`).
            scale, tau, alpha, start, end, norm, mode: see :class:`nagkit.NAGConfig`. Switching ``mode`` without a
                ``norm`` also switches to that mode's norm.

        Returns:
            self.
        """
        self._require_installed()
        if mode is not None and norm is None and mode != self.state.config.mode:
            norm = _mode_norm(mode, self._denoisers[0][1])
        config = self.state.config.with_updates(scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm,
                                                mode=mode)
        if negative_prompt is not None and negative is not None:
            raise ValueError("give either negative_prompt or negative, not both")
        if negative is not None:
            self._fixed = _check_negative_dict(negative, self._denoisers[0][1])
            self._negative_input, self._negative_prompt = negative, None
        elif negative_prompt is not None:
            _check_negative_prompt(negative_prompt)
            if self.spec is None:
                raise ValueError("negative_prompt needs a pipeline; for a bare denoiser pass negative={...}")
            self._negative_prompt, self._negative_input, self._fixed = negative_prompt, None, None
        self.state.config = config
        return self

    def remove(self) -> None:
        """Uninstall everything nagkit added; the target then behaves exactly as before :func:`apply`."""
        if not self._installed:
            return
        for module, processor in reversed(self._processors):
            module.set_processor(processor)
        for module, record in reversed(self._hooks):
            uninstall_hook(module, record)
        for name, record in self._wrapped.items():
            if record["had"]:
                setattr(self.target, name, record["value"])
            else:
                self.target.__dict__.pop(name, None)
        for obj in [self.target, *(m for m, _ in self._denoisers)]:
            if getattr(obj, _MARK, None) is self:
                delattr(obj, _MARK)
        self._processors, self._hooks, self._wrapped, self._denoisers, self._call = [], [], {}, [], None
        self._installed = False

    def __enter__(self) -> Guide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        what = type(self.target).__name__
        return f"Guide({what}, {self.state.config}, installed={self._installed})"

    # ------------------------------------------------------------------ installation
    def _install(self) -> None:
        targets = [self.target] if self.spec is None else [self.target, *self._pipeline_denoisers()]
        for obj in targets:
            if getattr(obj, _MARK, None) is not None:
                raise RuntimeError(f"NAG is already applied to this {type(obj).__name__}; call .remove() on the "
                                   "existing guide (or use guide.update(...)) before applying again")
        denoisers = self._pipeline_denoisers() if self.spec is not None else [self.target]
        plan = []
        for module in denoisers:
            adapter = adapter_for(module)
            plan.append((module, adapter, nag_modules(module, adapter)))  # validates before touching anything
        if self._negative_input is not None:
            self._fixed = _check_negative_dict(self._negative_input, plan[0][1])
        for module, adapter, attention in plan:
            for attn in attention.values():
                original = attn.processor
                attn.set_processor(adapter.processors[type(original)](original, self.state))
                self._processors.append((attn, original))
            for block in module.modules():
                forward = adapter.block_forwards.get(type(block))
                if forward is not None:
                    self._hooks.append((block, install_hook(block, NAGBlockHook(self.state, forward))))
            self._hooks.append((module, install_hook(module, NAGDenoiserHook(self, adapter, module))))
            self._denoisers.append((module, adapter))
            setattr(module, _MARK, self)
        if self.spec is not None:
            self._wrap_pipeline()
            setattr(self.target, _MARK, self)
        self._installed = True

    def _pipeline_denoisers(self) -> list[torch.nn.Module]:
        return pipeline_denoisers(self.target, self.spec)

    def _wrap(self, name: str, make: Any) -> None:
        pipe = self.target
        original = getattr(pipe, name)
        self._wrapped[name] = {"had": name in pipe.__dict__, "value": pipe.__dict__.get(name)}
        wrapper = make(original)
        wrapper.__wrapped__ = original  # keeps inspect.signature(...) of the pipeline method intact
        wrapper.__doc__ = original.__doc__
        setattr(pipe, name, wrapper)

    def _wrap_pipeline(self) -> None:
        """``check_inputs`` (first thing every pipeline call does) starts a call; ``encode_prompt`` gets the negative
        encoded alongside the prompt."""

        def check_inputs(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self._end_call()
                return original(*args, **kwargs)

            return wrapper

        def encode_prompt(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                self._begin_call(original, bind_arguments(original, args, kwargs), out)
                return out

            return wrapper

        if hasattr(self.target, "check_inputs"):
            self._wrap("check_inputs", check_inputs)
        self._wrap("encode_prompt", encode_prompt)

    # ------------------------------------------------------------------ per call
    def _begin_call(self, encode: Any, arguments: dict[str, Any], out: tuple) -> None:
        if self._call is not None and not self._call_started:
            return  # a second encode in the same call, before denoising: the pipeline's CFG negative (Flux true CFG)
        self._call_started = False
        spec = self.spec
        positive = out[spec.embeds_index]
        rows = positive.shape[0]
        if self.state.config.is_off:
            self._call = None
            return
        if self._fixed is not None:
            self._call = _Negative(embeds=self._fixed.embeds, mask=self._fixed.mask, positive=positive,
                                   extras=self._fixed.extras)
            return
        per_prompt = int(arguments.get(spec.count_arg) or 1)
        prompts = rows // per_prompt
        text = self._negative_prompt
        if text is None:  # official default: the call's CFG negative prompt, else ""
            text = arguments.get("negative_prompt") or ""
        if isinstance(text, str):
            negatives = [text] * prompts
        else:
            negatives = list(text)
            if len(negatives) != prompts:
                raise ValueError(f"negative_prompt has {len(negatives)} entries but the call has {prompts} prompts; "
                                 "give one string (used for every prompt) or exactly one per prompt")
        neg = encode(**negative_arguments(arguments, negatives, spec, self.negative_max_length))
        mask = neg[spec.mask_index] if spec.mask_index is not None else None
        extras = {"pooled_projections": neg[spec.pooled_index]} if spec.pooled_index is not None else {}
        self._call = _Negative(embeds=neg[spec.embeds_index], mask=mask, positive=positive, extras=extras)

    def _end_call(self) -> None:
        self._call = None
        self._call_started = False

    def _current_negative(self) -> _Negative | None:
        if self.spec is not None:
            if self._call is None and not self.state.config.is_off:
                raise RuntimeError(f"NAG was applied to {type(self.target).__name__}, which encodes the negative "
                                   "once per pipeline call; to call the denoiser directly, apply NAG to the denoiser "
                                   "with negative={...}")
            return self._call
        return self._fixed

    def _plan(self, adapter: Adapter, access: ArgAccess, args: tuple, kwargs: dict, module: torch.nn.Module,
              named: bool = False) -> tuple[tuple, dict, Packing] | None:
        """Guided-call inputs (packed text, mask) and layout, or None for a plain call.

        ``named``: the pipeline named this call through ``cache_context`` (then "uncond" calls never get here);
        otherwise a pipeline call whose text is not the prompt's is its separate unconditional call.
        """
        config = self.state.config
        if config.is_off:
            return None
        text = access.get(adapter.text_arg, args, kwargs)
        if not isinstance(text, torch.Tensor):
            return None
        negative = self._current_negative()
        if negative is None:
            return None
        if (config.start, config.end) != (0.0, 1.0):
            t = access.get(adapter.timestep_arg, args, kwargs)
            if t is not None and not _in_window(config, t, adapter):
                return None

        batch, r = text.shape[0], negative.embeds.shape[0]
        embeds, mask = negative.embeds, negative.mask
        if embeds.shape[-1] != text.shape[-1]:
            raise ValueError(f"negative embeddings have {embeds.shape[-1]} channels, the prompt's have "
                             f"{text.shape[-1]}")
        if batch == r:
            rows = slice(0, batch)
            if not named and negative.positive is not None and not _same(text, negative.positive):
                return None  # a separate unconditional call (e.g. Kontext/Chroma true CFG), never guided
        elif r == 1 and self.spec is None:
            rows = slice(0, batch)
            embeds = embeds.expand(batch, -1, -1)
            mask = mask.expand(batch, -1) if mask is not None else None
        elif batch == 2 * r:
            rows = _conditional_half(text, negative.positive, r)
        else:
            raise ValueError(f"the negative has {r} rows but the denoiser was called with batch {batch}; expected "
                             f"{r} (guide all rows) or {2 * r} (batched CFG: guide the conditional half)")
        embeds = embeds.to(device=text.device, dtype=text.dtype)
        ln = embeds.shape[1]
        if rows.stop - rows.start != batch:
            pad = [text.new_zeros(rows.start, ln, text.shape[-1]), embeds,
                   text.new_zeros(batch - rows.stop, ln, text.shape[-1])]
            embeds = torch.cat(pad, dim=0)
        args, kwargs = access.set(adapter.text_arg, torch.cat([text, embeds], dim=1), args, kwargs)

        if adapter.mask_arg is not None:
            pos_mask = access.get(adapter.mask_arg, args, kwargs)
            if pos_mask is not None or mask is not None:
                like = pos_mask if pos_mask is not None else text
                dtype = pos_mask.dtype if pos_mask is not None else torch.long
                if pos_mask is None:
                    length = text.shape[1]
                    if adapter.joint_mask:  # [text | image]: the image length is that of the image tokens
                        length += access.get("hidden_states", args, kwargs).shape[1]
                    pos_mask = torch.ones(batch, length, device=text.device, dtype=dtype)
                neg_mask = torch.ones(batch, ln, device=like.device, dtype=dtype)
                if mask is not None:
                    neg_mask = neg_mask.clone()
                    neg_mask[rows] = mask.to(device=like.device, dtype=dtype)
                lp = text.shape[1]
                packed = [pos_mask[:, :lp], neg_mask, pos_mask[:, lp:]] if adapter.joint_mask else [pos_mask, neg_mask]
                args, kwargs = access.set(adapter.mask_arg, torch.cat(packed, dim=1), args, kwargs)
        packing = Packing(lp=text.shape[1], ln=ln, rows=rows, batch=batch)
        if adapter.prepare is not None:
            extras = negative.extras
            if r == 1 and batch > 1 and self.spec is None:
                extras = {k: v.expand(batch, *v.shape[1:]) for k, v in extras.items()}
            args, kwargs = adapter.prepare(module, access, args, kwargs, extras, packing, self.state)
        return args, kwargs, packing

    def _require_installed(self) -> None:
        if not self._installed:
            raise RuntimeError("this guide was removed; call nagkit.apply(...) again")


def pipeline_denoisers(pipe: Any, spec: PipelineSpec) -> list[torch.nn.Module]:
    """The denoisers of ``pipe`` that NAG guides (e.g. both Wan 2.2 experts)."""
    found = [m for m in (getattr(pipe, name, None) for name in spec.denoisers) if m is not None]
    if not found:
        raise TypeError(f"{type(pipe).__name__} has no denoiser ({', '.join(spec.denoisers)})")
    return found


def _mode_norm(mode: str, adapter: Adapter) -> str:
    return adapter.official_norm if mode == "official" else "l1"


def _check_negative_prompt(negative_prompt: NegativePrompt) -> None:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise TypeError("negative_prompt must be a string or a list of strings (one per prompt)")
    if len(negative_prompt) == 0:
        raise ValueError("negative_prompt must not be an empty list")


def apply(target: Any, negative_prompt: NegativePrompt = None, *, negative: dict[str, Any] | None = None,
          scale: float | None = None, tau: float | None = None, alpha: float | None = None,
          start: float | None = None, end: float | None = None, norm: str | None = None,
          mode: str | None = None, preset: str | None = None, negative_max_length: int | None = None) -> Guide:
    """Install Normalized Attention Guidance on a diffusers pipeline or denoiser.

    Args:
        target: a supported pipeline (``StableDiffusionXLPipeline``, ``WanPipeline``…) or a bare denoiser
            (``UNet2DConditionModel``, ``WanTransformer3DModel``…) for custom sampling loops.
        negative_prompt: pipelines only. The NAG negative prompt: one string for every prompt, or a list with one
            negative per prompt. Default: the call's CFG ``negative_prompt`` if any, else ``""`` (official behaviour).
            Encoded by the pipeline's own ``encode_prompt`` with the call's settings.
        negative: precomputed negative instead of text: the negative's counterparts of the denoiser's forward
            arguments under the same names, e.g. ``{"encoder_hidden_states": emb}`` plus ``"encoder_attention_mask"``
            where the family has one. Batch 1 (used for every row) or one row per prompt. Required for a denoiser.
        scale: ``nag_scale`` (= paper φ + 1; ≤ 1 is off). Default: the family preset.
        tau: norm cap τ > 0. Default: the family preset.
        alpha: blend 0 ≤ α ≤ 1. Default: the family preset.
        start: schedule position (0..1) where NAG starts; default 0.
        end: schedule position (0..1) where NAG ends; default 1. Equals the official ``nag_end``.
        norm: ``"l1"`` or ``"l2"``. Default: ``"l1"``; with ``mode="official"``, the official code's norm (L2 on Flux).
        mode: ``"fast"`` (default) or ``"official"`` (reproduce the official diffusers outputs; Flux only differs).
        preset: name of a preset from :data:`nagkit.PRESETS` (default: the model family's).
        negative_max_length: pipelines with a T5-style ``max_sequence_length`` only: encode the negative with this
            shorter length (cheaper: the negative text's work scales with it). Changes results on models without a
            text mask (Flux, SD3): the dropped T5 padding tokens were keys too.

    Returns:
        A :class:`Guide`: ``update(...)``, ``remove()``, usable as a context manager.

    Example:
        >>> guide = nagkit.apply(pipe, negative_prompt="blurry, low quality", scale=5.0, tau=2.5, alpha=0.25)
        >>> image = pipe("a corgi", num_inference_steps=4, guidance_scale=0.0).images[0]
        >>> guide.remove()
    """
    _check_negative_prompt(negative_prompt)
    if negative_prompt is not None and negative is not None:
        raise ValueError("give either negative_prompt or negative, not both")
    pipeline = is_pipeline(target)
    if pipeline:
        spec = pipeline_spec(target)
        default_preset = spec.preset
        family = adapter_for(pipeline_denoisers(target, spec)[0])
    else:
        if not isinstance(target, torch.nn.Module):
            raise TypeError(f"nagkit.apply takes a diffusers pipeline or denoiser, got {type(target).__name__}; "
                            f"supported pipelines: {', '.join(sorted(PIPELINES))}; supported denoisers: "
                            f"{', '.join(supported_models())}")
        family = adapter_for(target)
        default_preset = family.preset
        if negative_prompt is not None:
            raise ValueError(f"negative_prompt needs a pipeline to encode it; for a bare {type(target).__name__} "
                             "pass negative={'encoder_hidden_states': ...}")
        if negative is None:
            raise ValueError(f"a bare {type(target).__name__} needs negative={{...}} (the negative's "
                             "encoder_hidden_states, and mask where the family has one)")
    base = get_preset(preset or default_preset)
    if mode is not None and norm is None:
        norm = _mode_norm(mode, family)
    config = base.with_updates(scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm, mode=mode)
    if negative_max_length is not None and (isinstance(negative_max_length, bool) or
                                            not isinstance(negative_max_length, int) or negative_max_length < 1):
        raise ValueError(f"negative_max_length must be a positive int, got {negative_max_length!r}")
    guide = Guide(target, config, negative_prompt, negative, negative_max_length)
    guide._install()
    return guide
