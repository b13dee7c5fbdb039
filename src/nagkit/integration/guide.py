"""``nagkit.apply``: install NAG on a diffusers pipeline or a bare denoiser, get a :class:`Guide` handle back.

What gets installed (and removed by :meth:`Guide.remove`):

* on each denoiser, one diffusers ``ModelHook`` (:mod:`nagkit.integration.hook`) that, on guided calls only, packs the
  negative text after the positive one and puts NAG processors over the guided attention modules' current processors
  for the duration of that forward (between calls the model carries exactly its own processors);
* on blocks whose text stream needs its own modulation (FLUX), a block hook that is a pass-through on plain calls;
* on a pipeline, instance-level wrappers of ``check_inputs`` (a call starts; a replaced denoiser is followed),
  ``encode_prompt`` (the NAG negative is encoded with the call's settings) and ``maybe_free_model_hooks`` (the call
  ends);
* ``__deepcopy__`` / ``__reduce_ex__`` instance attributes: a deep copy is an independent guided copy, pickling is
  refused with a clear error (hooks are closures).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Adapter, adapter_for, nag_modules, supported_models
from ..core.config import METHODS, NAGConfig, get_preset
from ..core.state import NAGState, Negative
from .hook import NAGBlockHook, NAGDenoiserHook, install_hook, uninstall_hook
from .pipelines import (
    PIPELINES,
    PipelineMethod,
    PipelineSpec,
    bind_arguments,
    encode_negative,
    is_pipeline,
    missing_encoders,
    pipeline_denoisers,
    pipeline_spec,
)

_MARK = "_nagkit_guide"
NegativePrompt = str | list[str] | None


def _text_shape(ndim: int) -> str:
    """The layout of text embeddings of ``ndim`` dimensions, for error messages (``Adapter.text_ndim``)."""
    return "(batch, tokens, channels)" if ndim == 3 else f"{ndim}-D (batch, tokens, ..., channels)"


def _check_negative_dict(negative: dict[str, Any], adapter: Adapter) -> Negative:
    allowed = {adapter.text_arg, *adapter.negative_keys} | ({adapter.mask_arg} if adapter.mask_arg else set())
    unknown = set(negative) - allowed
    if unknown:
        raise ValueError(f"negative has keys {sorted(unknown)} that {adapter.model_class.__name__} NAG does not use; "
                         f"allowed keys: {sorted(allowed)}")
    embeds = negative.get(adapter.text_arg)
    if isinstance(embeds, (list, tuple)) and adapter.plan is not None:  # per-row lists (Z-Image's cap_feats)
        if not embeds or len(negative) > 1 or not all(isinstance(e, torch.Tensor) and e.ndim == adapter.text_ndim - 1
                                                      for e in embeds):
            raise ValueError(f"negative[{adapter.text_arg!r}] as a list takes one (tokens, channels) tensor per row "
                             "and no other keys")
        return Negative(embeds=list(embeds))
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != adapter.text_ndim:
        raise ValueError(f"negative[{adapter.text_arg!r}] must be a {_text_shape(adapter.text_ndim)} tensor")
    mask = negative.get(adapter.mask_arg) if adapter.mask_arg else None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != embeds.shape[:2]):
        raise ValueError(f"negative[{adapter.mask_arg!r}] must be a (batch, tokens) tensor matching "
                         f"negative[{adapter.text_arg!r}] {tuple(embeds.shape[:2])}")
    extras = {k: negative[k] for k in adapter.negative_keys if negative.get(k) is not None}
    for key, value in extras.items():
        dim = adapter.batch_dims.get(key, 0)  # batch not first: e.g. HiDream's Llama states (layers, B, L, C)
        if not isinstance(value, torch.Tensor) or value.ndim <= dim or value.shape[dim] != embeds.shape[0]:
            raise ValueError(f"negative[{key!r}] must be a tensor with the same batch as "
                             f"negative[{adapter.text_arg!r}] ({embeds.shape[0]}) on its dimension {dim}")
    return Negative(embeds=embeds, mask=mask, extras=extras)


def _check_pipeline_embeddings(pipe: Any, spec: PipelineSpec, embeds: torch.Tensor | None, mask: torch.Tensor | None,
                               pooled: torch.Tensor | None) -> Negative | None:
    """``negative_prompt_embeds`` & co. given to ``apply``/``update`` for a pipeline, as a :class:`Negative`."""
    if embeds is None:
        if mask is not None or pooled is not None:
            raise ValueError("negative_prompt_attention_mask / negative_pooled_prompt_embeds need "
                             "negative_prompt_embeds")
        return None
    ndim = adapter_for(pipeline_denoisers(pipe, spec)[0]).text_ndim
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != ndim:
        raise ValueError(f"negative_prompt_embeds must be a {_text_shape(ndim)} tensor")
    if mask is not None:
        if spec.mask_index is None:
            raise ValueError(f"{type(pipe).__name__} has no text mask: negative_prompt_attention_mask is not used")
        if not isinstance(mask, torch.Tensor) or mask.shape != embeds.shape[:2]:
            raise ValueError(f"negative_prompt_attention_mask must be a (batch, tokens) tensor matching "
                             f"negative_prompt_embeds {tuple(embeds.shape[:2])}")
    extras = {}
    if pooled is not None:
        if "pooled_projections" not in spec.extras:
            raise ValueError(f"NAG on {type(pipe).__name__} keeps the prompt's pooled embedding (as the official "
                             "code): negative_pooled_prompt_embeds is not used")
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != embeds.shape[0]:
            raise ValueError("negative_pooled_prompt_embeds must be a (batch, channels) tensor with the batch of "
                             "negative_prompt_embeds")
        extras["pooled_projections"] = pooled
    return Negative(embeds=embeds, mask=mask, extras=extras)


def _check_negative_prompt(negative_prompt: NegativePrompt) -> None:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise TypeError("negative_prompt must be a string or a list of strings (one per prompt)")
    if len(negative_prompt) == 0:
        raise ValueError("negative_prompt must not be an empty list")


def _mode_norm(mode: str, adapter: Adapter) -> str:
    return adapter.official_norm if mode == "official" else "l1"


def _check_mode(mode: str | None, adapter: Adapter) -> None:
    if mode == "official" and not adapter.official:
        raise ValueError(f"mode='official' is not available for {adapter.model_class.__name__} (no official NAG "
                         "implementation exists to reproduce); use mode='fast'")


#: Families (denoiser class names) whose every guided attention layer goes through nagkit's kernels
#: (:func:`nagkit.kernels.joint.nag_joint_attention`, :func:`nagkit.kernels.cross.nag_cross_attention`), where
#: ``method="vsf"`` is implemented. The other families compute their attention themselves and only combine ``Z+`` and
#: ``Z-`` (NAG, NASA): they refuse VSF. Tested against reference implementations: FLUX (the embedded toy model's
#: architecture), Wan and the UNets (``tests/test_methods.py``); the others run the same kernel code.
VSF_FAMILIES = frozenset({
    "FluxTransformer2DModel", "ChromaTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
    "WanVACETransformer3DModel", "UNet2DConditionModel", "PixArtTransformer2DModel", "SanaTransformer2DModel",
    "LTXVideoTransformer3DModel", "HunyuanVideoTransformer3DModel", "QwenImageTransformer2DModel",
    "HiDreamImageTransformer2DModel",
})


def _check_method(method: str, adapter: Adapter) -> None:
    """Refuse a method the family cannot compute (VSF outside :data:`VSF_FAMILIES`), naming the family."""
    name = adapter.model_class.__name__
    if method == "vsf" and name not in VSF_FAMILIES:
        raise ValueError(f"method='vsf' is not available for {name}: its NAG attention is computed by the family's "
                         "own code, not by nagkit's joint/cross-attention kernels where VSF is implemented; "
                         f"use method='nag' or 'nasa' (VSF families: {', '.join(sorted(VSF_FAMILIES))})")


def _check_method_params(method: str, tau: float | None, alpha: float | None, norm: str | None,
                         mode: str | None = None) -> None:
    """NASA and VSF do not use NAG's tau/alpha/norm and have no official mode: refuse them when given (never
    silently ignored)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "nag":
        return
    if mode == "official":
        raise ValueError(f"mode='official' reproduces the official NAG code: method={method!r} has no official mode "
                         "in nagkit; use mode='fast'")
    for name, value in (("tau", tau), ("alpha", alpha), ("norm", norm)):
        if value is not None:
            used = "scale (phi)" if method == "nasa" else "scale (beta) and offset"
            raise ValueError(f"{name} is a NAG parameter: method={method!r} does not use it (it takes {used}); "
                             f"leave {name} unset")


@dataclass
class _Installed:
    """What one guide installed on one denoiser."""

    module: torch.nn.Module
    adapter: Adapter
    hooks: list[tuple[torch.nn.Module, dict[str, Any]]] = field(default_factory=list)


class _CopyGuided:
    """``__deepcopy__`` of a guided target: copy it clean, then guide the copy with the same settings."""

    def __init__(self, guide: Guide, module: torch.nn.Module | None = None) -> None:
        self.guide = guide
        self.module = module  # a pipeline's denoiser copied on its own: the copy is plain (NAG is the pipeline's)

    def __call__(self, memo: dict) -> Any:
        guide = self.guide
        target = guide.target if self.module is None else self.module
        guide._uninstall()
        try:
            clone = copy.deepcopy(target, memo)
        finally:
            guide._install()
        if self.module is None:
            twin = Guide(clone, guide.state.config, guide._negative_prompt, copy.deepcopy(guide.state.fixed, memo),
                         guide.negative_max_length, guide.expert)
            twin._nag_base = guide._nag_base
            for name, view in guide._experts.items():
                twin._expert_state(name).override = view.override
            twin._install()
        return clone


# Two-expert pipelines (Wan 2.2 A14B): the high-noise expert runs first (``transformer``), the low-noise one after
# ``boundary_ratio`` (``transformer_2``).
EXPERTS = {"high": "transformer", "low": "transformer_2"}


def _check_expert(expert: str, target: Any) -> None:
    if expert not in ("both", *EXPERTS):
        raise ValueError(f"expert must be 'high', 'low' or 'both', got {expert!r}")
    if expert != "both" and (not is_pipeline(target) or getattr(target, EXPERTS["low"], None) is None):
        raise ValueError(f"expert={expert!r} needs a two-expert pipeline (Wan 2.2 A14B: transformer = high-noise "
                         f"expert, transformer_2 = low-noise expert); {type(target).__name__} has no transformer_2")


class _ExpertState:
    """One expert's view of a guide's :class:`NAGState`: its own ``config`` once set by ``update(expert=...)``,
    everything else (the call's negative, packing, counters) shared with the guide."""

    def __init__(self, shared: NAGState) -> None:
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "override", None)

    @property
    def config(self) -> NAGConfig:
        return self.override if self.override is not None else self._shared.config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_shared":
            raise AttributeError(name)
        return getattr(self._shared, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("config", "override"):
            object.__setattr__(self, "override", value)
        else:
            setattr(self._shared, name, value)


class _RefusePickle:
    def __init__(self, target: Any) -> None:
        self.name = type(target).__name__

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"cannot pickle a {self.name} with NAG installed (its hooks are not picklable): pickle it "
                        "before nagkit.apply or after guide.remove(), and apply NAG again after loading")


class Guide:
    """Handle of an installed NAG: change settings with :meth:`update`, uninstall with :meth:`remove`.

    Also a context manager: ``with nagkit.apply(pipe, ...): ...`` removes NAG on exit (even after an exception).
    Create it with :func:`nagkit.apply`.
    """

    def __init__(self, target: Any, config: NAGConfig, negative_prompt: NegativePrompt, fixed: Negative | None,
                 negative_max_length: int | None = None, expert: str = "both") -> None:
        self.target = target
        self.expert = expert
        self._experts: dict[str, _ExpertState] = {}  # two-expert pipelines: each expert's view of the state
        self.negative_max_length = negative_max_length
        self.state = NAGState(config=config, fixed=fixed)
        # the NAG settings to return to when ``update(method="nag")`` follows NASA/VSF
        self._nag_base = config if config.method == "nag" else NAGConfig()
        self.spec: PipelineSpec | None = pipeline_spec(target) if is_pipeline(target) else None
        self._negative_prompt = negative_prompt
        self._denoisers: list[_Installed] = []
        self._wrapped: dict[str, dict[str, Any]] = {}  # attributes of the target set by nagkit
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

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        """The denoisers NAG is installed on (a pipeline's replaced denoiser is followed at its next call)."""
        return [d.module for d in self._denoisers]

    def update(self, negative_prompt: NegativePrompt = None, *, negative: dict[str, Any] | None = None,
               negative_prompt_embeds: torch.Tensor | None = None,
               negative_prompt_attention_mask: torch.Tensor | None = None,
               negative_pooled_prompt_embeds: torch.Tensor | None = None,
               scale: float | None = None, tau: float | None = None, alpha: float | None = None,
               start: float | None = None, end: float | None = None, norm: str | None = None,
               mode: str | None = None, expert: str | None = None, method: str | None = None,
               offset: float | None = None) -> Guide:
        """Change settings; they take effect on the next call. Arguments left as None keep their value.

        Args:
            negative_prompt: new NAG negative prompt (pipelines), a string or one string per prompt.
            negative: new precomputed negative under the denoiser's argument names (see :func:`nagkit.apply`).
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds: new negative in
                the pipeline's embedding form (see :func:`nagkit.apply`).
            scale, tau, alpha, start, end, norm, mode: see :class:`nagkit.NAGConfig`. Switching ``mode`` without a
                ``norm`` also switches to that mode's norm.
            method: ``"nag"``, ``"nasa"`` or ``"vsf"`` (experimental; see :class:`nagkit.NAGConfig`). Switching to
                NASA/VSF without ``scale``/``offset`` takes the method's defaults; switching back to ``"nag"`` restores
                the NAG settings the guide was applied with (its preset and overrides) unless given.
            offset: VSF's logit offset on the negative's keys (``method="vsf"`` only).
            expert: two-expert pipelines (Wan 2.2 A14B): ``"high"`` or ``"low"`` changes the settings of that expert
                only (its own scale/tau/alpha/window from then on; the negative stays shared); ``None`` (default) or
                ``"both"`` changes the settings shared by the experts without their own.

        Returns:
            self.
        """
        self._require_installed()
        adapter = self._denoisers[0].adapter
        _check_mode(mode, adapter)
        view = None
        if expert is not None and expert != "both":
            _check_expert(expert, self.target)
            if self.expert not in ("both", expert):
                raise ValueError(f"expert={expert!r}: this guide guides only the {self.expert!r} expert")
            view = self._expert_state(expert)
        current = view.config if view is not None else self.state.config
        target = current.method if method is None else method
        _check_method_params(target, tau, alpha, norm, mode)
        _check_method(target, adapter)
        if target == "nag" and current.method != "nag":  # back to NAG: the NAG settings the guide started from
            current = self._nag_base.with_updates(start=current.start, end=current.end)
        if mode is not None and norm is None and mode != current.mode:
            norm = _mode_norm(mode, adapter)
        config = current.with_updates(scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm,
                                      mode=mode, method=method, offset=offset)
        given = [x is not None for x in (negative_prompt, negative, negative_prompt_embeds)]
        if sum(given) > 1:
            raise ValueError("give one of negative_prompt, negative, negative_prompt_embeds")
        if negative is not None:
            self.state.fixed, self._negative_prompt = _check_negative_dict(negative, adapter), None
        elif negative_prompt_embeds is not None:
            if self.spec is None:
                raise ValueError("negative_prompt_embeds needs a pipeline; for a bare denoiser pass negative={...}")
            self.state.fixed = _check_pipeline_embeddings(self.target, self.spec, negative_prompt_embeds,
                                                          negative_prompt_attention_mask, negative_pooled_prompt_embeds)
            self._negative_prompt = None
        elif negative_prompt is not None:
            _check_negative_prompt(negative_prompt)
            if self.spec is None:
                raise ValueError("negative_prompt needs a pipeline; for a bare denoiser pass negative={...}")
            _check_can_encode(self.target, self.spec, negative_prompt)
            self._negative_prompt, self.state.fixed = negative_prompt, None
        if view is not None:
            view.override = config
        else:
            self.state.config = config
        return self

    def expert_config(self, expert: str) -> NAGConfig:
        """The settings of one expert (``"high"``/``"low"``) of a two-expert pipeline (Wan 2.2 A14B)."""
        _check_expert(expert, self.target)
        return self._expert_state(expert).config

    def _expert_state(self, expert: str) -> _ExpertState:
        if expert not in self._experts:
            self._experts[expert] = _ExpertState(self.state)
        return self._experts[expert]

    def _guided_denoisers(self) -> list[torch.nn.Module]:
        """The pipeline's denoisers this guide guides (``expert`` filters the Wan 2.2 experts)."""
        denoisers = pipeline_denoisers(self.target, self.spec)
        if self.expert == "both":
            return denoisers
        chosen = getattr(self.target, EXPERTS[self.expert], None)
        return [m for m in denoisers if m is chosen]

    def _state_for(self, module: torch.nn.Module) -> Any:
        """The state the hooks of ``module`` see: an expert's own view on two-expert pipelines, else the guide's."""
        if self.spec is None or getattr(self.target, EXPERTS["low"], None) is None:
            return self.state
        for name, attribute in EXPERTS.items():
            if getattr(self.target, attribute, None) is module:
                return self._expert_state(name)
        return self.state

    def remove(self) -> None:
        """Uninstall everything nagkit added; the target then behaves exactly as before :func:`apply`."""
        if not self._installed:
            return
        self._uninstall()
        self.state.end_call()

    def __enter__(self) -> Guide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Guide({type(self.target).__name__}, {self.state.config}, installed={self._installed})"

    # ------------------------------------------------------------------ installation
    def _plan(self) -> list[tuple[torch.nn.Module, Adapter]]:
        """The denoisers to guide with their families; validates everything before anything is touched."""
        denoisers = self._guided_denoisers() if self.spec is not None else [self.target]
        plan = []
        for module in denoisers:
            owner = getattr(module, _MARK, None)
            if owner is not None and owner is not self:
                raise RuntimeError(f"NAG is already applied to this {type(module).__name__}; call .remove() on the "
                                   "existing guide (or use guide.update(...)) before applying again")
            adapter = adapter_for(module)
            nag_modules(module, adapter)  # raises when no supported text attention is found
            plan.append((module, adapter))
        return plan

    def _install_denoiser(self, module: torch.nn.Module, adapter: Adapter) -> None:
        entry = _Installed(module, adapter)
        pipeline = type(self.target).__name__ if self.spec is not None else None
        state = self._state_for(module)
        for block in module.modules():
            forward = adapter.block_forwards.get(type(block))
            if forward is not None:
                entry.hooks.append((block, install_hook(block, NAGBlockHook(state, forward))))
        hook = NAGDenoiserHook(state, adapter, nag_modules(module, adapter), pipeline)
        entry.hooks.append((module, install_hook(module, hook)))
        self._set(module, _MARK, self)
        if self.spec is not None:
            self._set(module, "__deepcopy__", _CopyGuided(self, module))
        self._denoisers.append(entry)

    def _install(self) -> None:
        if getattr(self.target, _MARK, None) is not None:
            raise RuntimeError(f"NAG is already applied to this {type(self.target).__name__}; call .remove() on the "
                               "existing guide (or use guide.update(...)) before applying again")
        for module, adapter in self._plan():
            self._install_denoiser(module, adapter)
        if self.spec is not None:
            if hasattr(self.target, "check_inputs"):
                self._set(self.target, "check_inputs", PipelineMethod(self.target.check_inputs, self._start_call))
            self._set(self.target, "encode_prompt", PipelineMethod(self.target.encode_prompt, self._encode))
            if hasattr(self.target, "maybe_free_model_hooks"):
                self._set(self.target, "maybe_free_model_hooks",
                          PipelineMethod(self.target.maybe_free_model_hooks, self._end_call))
        self._set(self.target, _MARK, self)
        self._set(self.target, "__deepcopy__", _CopyGuided(self))
        self._set(self.target, "__reduce_ex__", _RefusePickle(self.target))
        self._installed = True

    def _uninstall(self) -> None:
        for entry in reversed(self._denoisers):
            for module, record in reversed(entry.hooks):
                uninstall_hook(module, record)
        for (_, name), record in reversed(list(self._wrapped.items())):
            obj = record["object"]
            if record["had"]:
                obj.__dict__[name] = record["value"]
            else:
                obj.__dict__.pop(name, None)
        self._denoisers, self._wrapped = [], {}
        self._installed = False

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute, remembering what was there for :meth:`_uninstall`."""
        key = (id(obj), name)
        if key not in self._wrapped:
            self._wrapped[key] = {"object": obj, "had": name in obj.__dict__, "value": obj.__dict__.get(name)}
        obj.__dict__[name] = value

    def _follow_denoisers(self) -> None:
        """A pipeline's denoiser was replaced (``pipe.unet = other``): move NAG to the new one."""
        current = self._guided_denoisers()
        if [d.module for d in self._denoisers] == current:
            return
        self._uninstall()
        self._install()

    # ------------------------------------------------------------------ per pipeline call
    def _start_call(self, original: Any, args: tuple, kwargs: dict) -> Any:
        """``check_inputs``: a pipeline call begins (no stale negative survives a call that failed earlier)."""
        self.state.end_call()
        if self.spec is not None:
            self._follow_denoisers()
            arguments = bind_arguments(original, args, kwargs)
            self.state.call_arguments = {k: v for k, v in arguments.items() if k.startswith("negative_")}
        return original(*args, **kwargs)

    def _end_call(self, original: Any, args: tuple, kwargs: dict) -> Any:
        """``maybe_free_model_hooks``, the last thing every pipeline call does: the call's negative is gone, so a
        later call of the shared denoiser from elsewhere (``from_pipe``) is refused instead of using it."""
        self.state.end_call()
        return original(*args, **kwargs)

    def _encode(self, original: Any, args: tuple, kwargs: dict) -> Any:
        """``encode_prompt``: encode the prompt, then the NAG negative with the same settings."""
        out = original(*args, **kwargs)
        state = self.state
        if state.negative is not None and not state.call_started:
            return out  # a second encode in the same call, before denoising: the pipeline's CFG negative (FLUX)
        state.call_started = False
        if state.config.is_off and all(view.config.is_off for view in self._experts.values()):
            state.negative = None
            return out
        arguments = bind_arguments(original, args, kwargs)
        state.negative = encode_negative(self.target, self.spec, state, original, arguments, out,
                                         self._negative_prompt, self.negative_max_length,
                                         batch_dims=self._denoisers[0].adapter.batch_dims if self._denoisers else None)
        return out

    def _require_installed(self) -> None:
        if not self._installed:
            raise RuntimeError("this guide was removed; call nagkit.apply(...) again")


def _check_can_encode(pipe: Any, spec: PipelineSpec, negative_prompt: NegativePrompt) -> None:
    missing = missing_encoders(pipe, spec)
    if missing and negative_prompt is not None:
        raise ValueError(f"negative_prompt={negative_prompt!r} needs {type(pipe).__name__}'s text encoders, but it "
                         f"has no {', '.join(missing)}: give the negative in embedding form, "
                         "nagkit.apply(pipe, negative_prompt_embeds=...)")


def apply(target: Any, negative_prompt: NegativePrompt = None, *, negative: dict[str, Any] | None = None,
          negative_prompt_embeds: torch.Tensor | None = None,
          negative_prompt_attention_mask: torch.Tensor | None = None,
          negative_pooled_prompt_embeds: torch.Tensor | None = None,
          scale: float | None = None, tau: float | None = None, alpha: float | None = None,
          start: float | None = None, end: float | None = None, norm: str | None = None,
          mode: str | None = None, preset: str | None = None, negative_max_length: int | None = None,
          expert: str = "both", method: str | None = None, offset: float | None = None) -> Guide:
    """Install Normalized Attention Guidance on a diffusers pipeline or denoiser.

    Args:
        target: a supported pipeline (``StableDiffusionXLPipeline``, ``WanPipeline``…) or a bare denoiser
            (``UNet2DConditionModel``, ``WanTransformer3DModel``…) for custom sampling loops.
        negative_prompt: pipelines only. The NAG negative prompt: one string for every prompt, or a list with one
            negative per prompt. Default: the call's CFG ``negative_prompt`` (or its ``negative_prompt_embeds``) if
            any, else ``""`` (official behaviour). Encoded by the pipeline's own ``encode_prompt`` with the call's
            settings.
        negative: precomputed negative instead of text: the negative's counterparts of the denoiser's forward
            arguments under the same names, e.g. ``{"encoder_hidden_states": emb}`` plus ``"encoder_attention_mask"``
            where the family has one. Batch 1 (used for every row) or one row per prompt. Required for a denoiser.
        negative_prompt_embeds: pipelines only: the negative in the pipeline's embedding form (what its
            ``encode_prompt`` returns as prompt embeddings), e.g. for a pipeline built without text encoders. One row
            (every prompt) or one per prompt; repeated for ``num_images_per_prompt``.
        negative_prompt_attention_mask: its padding mask (PixArt, Sana, Chroma).
        negative_pooled_prompt_embeds: its pooled embedding (FLUX: the negative branch's modulation, official).
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
        expert: two-expert pipelines (Wan 2.2 A14B ``WanPipeline`` / ``WanImageToVideoPipeline`` with
            ``transformer_2``): ``"both"`` (default) guides both experts, ``"high"`` only the high-noise expert
            ``transformer`` (steps with t >= ``boundary_ratio``), ``"low"`` only the low-noise expert
            ``transformer_2``. To give each expert its own settings, apply with ``"both"`` and then
            ``guide.update(expert="low", scale=..., end=...)`` (windows are positions in the whole schedule).
        method: ``"nag"`` (default), or the experimental competing methods ``"nasa"`` (NASA: ``Z+ − φ·Z-``,
            ``scale`` = φ, default 0.25) and ``"vsf"`` (Value Sign Flip: the negative's keys in the same softmax as
            the prompt's with values ``× −β``, ``scale`` = β, default 3.5, and ``offset``). NASA/VSF take no
            ``tau``/``alpha``/``norm`` (refused when given) and no ``mode="official"``; windows, CFG (conditional rows
            only) and per-sample negatives work as for NAG. VSF needs a family of
            :data:`nagkit.integration.guide.VSF_FAMILIES`. See :class:`nagkit.NAGConfig`.
        offset: VSF only: subtracted from the image queries' attention logits on the negative's keys (default 0.1).

    Returns:
        A :class:`Guide`: ``update(...)``, ``remove()``, usable as a context manager.

    Raises:
        TypeError: for an unsupported pipeline or denoiser (naming its class and the supported ones).
        ValueError: for out-of-range settings (naming the parameter and its range) or a negative the target cannot
            use (e.g. a string negative for a pipeline without text encoders).

    Example:
        >>> guide = nagkit.apply(pipe, negative_prompt="blurry, low quality", scale=5.0, tau=2.5, alpha=0.25)
        >>> image = pipe("a corgi", num_inference_steps=4, guidance_scale=0.0).images[0]
        >>> guide.remove()
    """
    _check_negative_prompt(negative_prompt)
    _check_expert(expert, target)
    given = [x is not None for x in (negative_prompt, negative, negative_prompt_embeds)]
    if sum(given) > 1:
        raise ValueError("give one of negative_prompt, negative, negative_prompt_embeds")
    fixed = None
    if is_pipeline(target):
        spec = pipeline_spec(target)
        default_preset = spec.preset
        family = adapter_for(pipeline_denoisers(target, spec)[0])
        _check_can_encode(target, spec, negative_prompt)
        fixed = _check_pipeline_embeddings(target, spec, negative_prompt_embeds, negative_prompt_attention_mask,
                                           negative_pooled_prompt_embeds)
    else:
        if not isinstance(target, torch.nn.Module):
            raise TypeError(f"nagkit.apply takes a diffusers pipeline or denoiser, got {type(target).__name__}; "
                            f"supported pipelines: {', '.join(sorted(PIPELINES))}; supported denoisers: "
                            f"{', '.join(supported_models())}")
        family = adapter_for(target)
        default_preset = family.preset
        if negative_prompt is not None or negative_prompt_embeds is not None:
            raise ValueError(f"negative_prompt needs a pipeline to encode it (negative_prompt_embeds too); for a bare "
                             f"{type(target).__name__} pass negative={{'encoder_hidden_states': ...}}")
        if negative is None:
            raise ValueError(f"a bare {type(target).__name__} needs negative={{...}} (the negative's "
                             "encoder_hidden_states, and mask where the family has one)")
    if negative is not None:
        fixed = _check_negative_dict(negative, family)
    base = get_preset(preset or default_preset)
    _check_mode(mode or base.mode, family)
    _check_method_params(method or base.method, tau, alpha, norm, mode)
    _check_method(method or base.method, family)
    if mode is not None and norm is None:
        norm = _mode_norm(mode, family)
    config = base.with_updates(scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm, mode=mode,
                               method=method, offset=offset)
    if negative_max_length is not None and (isinstance(negative_max_length, bool) or
                                            not isinstance(negative_max_length, int) or negative_max_length < 1):
        raise ValueError(f"negative_max_length must be a positive int, got {negative_max_length!r}")
    guide = Guide(target, config, negative_prompt, fixed, negative_max_length, expert)
    if config.method != "nag":  # update(method="nag") later returns to the preset's NAG settings
        guide._nag_base = base if base.method == "nag" else NAGConfig()
    guide._install()
    return guide
