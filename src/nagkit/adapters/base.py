"""What nagkit knows about a model family, and the registries every family fills in.

One family is one module of this package (``unet.py``, ``wan.py``, ``flux.py``…) that ends with one
``register_adapter(Adapter(...))``. The :class:`Adapter` carries everything about the family:

* the denoiser: its class, which attention modules get NAG (``select``), the NAG processor class for each original
  processor class it can wrap (the original processor's code with its attention call replaced by
  :func:`nagkit.kernels.nag_cross_attention` or :func:`nagkit.kernels.joint.nag_joint_attention`), how the negative
  is packed (``text_arg``, ``mask_arg``/``mask_packer``, ``prepare``), block hooks, the timestep window, the
  official-mode norm;
* its diffusers pipelines (:class:`PipelineSpec`: how ``encode_prompt`` makes the NAG negative) and presets
  (:class:`~nagkit.core.config.NAGConfig` with where the values come from);
* its tiny seeded pipelines for tests and CPU demos (:class:`TinyModel`; shared fixture helpers live in
  :mod:`nagkit.tiny`, imported inside the builders) and its meta-input builder for ``nagkit bench``.

:func:`register_adapter` puts all of it in the registries: the adapters, :data:`PIPELINES`,
:data:`nagkit.core.config.PRESETS` and :data:`TINY_MODELS`. Family modules must not import :mod:`nagkit.integration`
at import time (it imports this package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.config import NAGConfig, register_preset
from ..core.state import NAGState

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class NAGProcessor:
    """Base of every NAG attention processor.

    It wraps the module's original processor (``inner``), which it calls unchanged whenever the current denoiser call
    is not guided, and which :meth:`nagkit.Guide.remove` puts back. Subclasses re-declare the exact ``__call__``
    parameters of the processor they replace, because diffusers drops keyword arguments a processor does not name.
    """

    def __init__(self, inner: object | None = None, state: NAGState | None = None) -> None:
        # No required arguments: diffusers re-creates processors by calling their class with none (IP-Adapter
        # loading). Without a state the processor is a pass-through to ``inner``.
        self.inner = inner
        self.state = state

    @property
    def packing(self):  # noqa: ANN201
        """The layout of the guided call in flight, or None (then the processor passes through to ``inner``)."""
        return None if self.state is None else self.state.packing

    # diffusers' ``set_attention_backend`` writes these on processors; keep them on the original one.
    @property
    def _attention_backend(self):  # noqa: ANN202
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:  # noqa: ANN001
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):  # noqa: ANN202
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:  # noqa: ANN001
        self.inner._parallel_config = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={type(self.inner).__name__})"


@dataclass(frozen=True)
class PipelineSpec:
    """How to read one pipeline family's ``encode_prompt``.

    Attributes:
        denoisers: attribute names of the denoisers to guide (those that exist and are not None).
        embeds_index: position of the positive text embeddings in ``encode_prompt``'s return tuple.
        mask_index: position of the positive text mask, or None.
        extras: denoiser argument -> position in ``encode_prompt``'s return tuple of further inputs the negative
            branch takes from the negative's encoding (FLUX: ``{"pooled_projections": 1}``, the negative's pooled
            embedding, as the official code). Others keep the prompt's (SD3/SDXL pooled embeddings, official).
        count_arg: the ``num_*_per_prompt`` argument name.
        overrides: extra ``encode_prompt`` arguments for the negative (how the pipeline encodes its CFG negative).
        preset: default preset.
        encoders: text encoder attributes that ``encode_prompt`` needs to encode a string.
        embeds_args: negative field -> name of the call's own argument carrying it in embedding form
            (``"embeds"``, ``"mask"`` and the ``extras`` keys).
        cfg_arg: the call argument that sets the CFG scale (``"auto"``: ``true_cfg_scale`` where the pipeline has
            one, else ``guidance_scale``; ``""``: the pipeline has no CFG, e.g. FLUX.2-dev, whose ``guidance_scale`` is
            a distilled guidance embedding). Read by the command line.
        cfg_min: CFG runs when that scale is above this (1 for most pipelines, 0 for Z-Image and Krea 2).
        requires_image: the pipeline needs a conditioning ``image`` although its signature defaults it to None
            (edit pipelines); the command line asks for ``--image`` before loading.
        size_multiple: image height/width must be multiples of the VAE's spatial factor times this (2 where the
            pipeline packs 2x2 latent patches: FLUX, SD3, Wan), checked by the command line before loading weights.
        encode_negative: ``encode_negative(encode, arguments) -> tuple`` replaces ``encode(**arguments)`` for the
            NAG negative (``arguments``: the call's ``encode_prompt`` arguments with the negatives as ``prompt``),
            for pipelines that encode their CFG negative differently from prompts in a way ``overrides`` cannot say
            (Lumina 2: the system prompt goes before prompts only); its tuple is read like ``encode_prompt``'s.
        post_encode: ``post_encode(pipe, negative) -> Negative`` turns the NAG negative, however it was made
            (encoded from text, or given in the pipeline's embedding form), into what the denoiser receives, for
            pipelines that post-process ``encode_prompt``'s output before the denoiser (LTX-2: ``pipe.connectors``
            make the video and audio text); None: the negative as ``encode_prompt`` returns it.
        cfg_setter: for pipelines whose CFG scale is a setting of the pipeline, not a call argument (``cfg_arg=""``;
            HunyuanVideo 1.5's guider): ``cfg_setter(pipe, scale) -> (scale_in_effect, restore)`` puts ``scale`` in
            place for one call (None: leaves the pipeline's own) and returns the scale in effect (None: no CFG) and
            a function that restores the pipeline's setting; its ``setting`` attribute names it (``"guider.
            guidance_scale"``). Read by the command line (``--cfg-scale``); None: ``cfg_arg`` says it all.
    """

    denoisers: tuple[str, ...]
    embeds_index: int = 0
    mask_index: int | None = None
    extras: dict[str, int] = field(default_factory=dict)
    count_arg: str = "num_images_per_prompt"
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str = ""
    encoders: tuple[str, ...] = ("text_encoder",)
    embeds_args: dict[str, str] = field(default_factory=lambda: {"embeds": "negative_prompt_embeds"})
    size_multiple: int = 1
    encode_negative: Callable | None = None
    cfg_arg: str = "auto"
    cfg_min: float = 1.0
    requires_image: bool = False
    post_encode: Callable | None = None
    cfg_setter: Callable | None = None


@dataclass(frozen=True)
class TinyModel:
    """A tiny, seeded-random, offline pipeline of a family (tests, CPU demos, ``nagkit generate tiny-…``).

    Attributes:
        builder: ``builder(seed=0)`` returns the pipeline on CPU in float32; nothing is downloaded.
        call_kwargs: recommended small call arguments (size, frames, text length…).
    """

    builder: Callable[..., DiffusionPipeline]
    call_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """How NAG installs on one denoiser class.

    Attributes:
        family: short family name (also the default preset name).
        model_class: the diffusers denoiser class.
        processors: original processor class -> NAG processor class that replaces it.
        select: ``select(module_name, module) -> bool``: the attention modules that get NAG.
        text_arg: forward argument holding the text embeddings (packed as ``[positive | negative]``).
        mask_arg: forward argument holding a ``(B, L)`` text padding mask, or None when the family has none.
        pack_mask: ``pack_mask(access, args, kwargs, negative_mask, packing) -> (args, kwargs)``: packs the mask
            argument for a guided call; default: ``mask_arg`` is a ``(B, L)`` text mask that becomes
            ``[positive | negative]`` (families whose mask covers more than the text override it, e.g. Chroma).
        timestep_arg: forward argument holding the timestep (for the ``start``/``end`` window).
        timestep_max: the training horizon ``T`` in ``u = 1 − t/T``.
        window: ``window(config, t) -> bool``: whether a call at timestep ``t`` is guided; default
            ``config.in_window(t, timestep_max)`` (UNet overrides it with the official integer rule).
        preset: default preset name.
        notes: one line for ``nagkit info``.
        negative_keys: further forward arguments a negative may carry (e.g. Flux's ``pooled_projections``).
        batch_dims: forward arguments (negative keys) whose batch is not their first dimension -> their batch
            dimension, for checking and repeating a negative's rows (HiDream's Llama states ``(layers, B, L, C)``: 1).
        prepare: ``prepare(model, access, args, kwargs, negative, packing, state) -> (args, kwargs)``, run after
            the text is packed on a guided call: extra packing (e.g. text position ids) and per-call state.
        official_norm: the norm the official implementation uses for this family (``mode="official"``).
        plan: replaces the default packing of a guided call (families whose text cannot ride after the prompt's:
            text-mixing refiners, positions tied to the text length, list inputs): ``plan(module, access, args,
            kwargs, negative, state, pipeline, named) -> (args, kwargs, packing) | None``, called after the window
            check (see :func:`nagkit.integration.hook.plan_call` and ``guided_rows`` there).
        official: whether an official NAG implementation exists to reproduce (``mode="official"``); False refuses
            that mode at ``nagkit.apply``/``Guide.update``.
        block_forwards: block class -> ``forward(block, state, original_forward, *args, **kwargs)`` used for that
            block on guided calls (per-segment modulation of the text stream), installed as a block hook.
        pipelines: diffusers pipeline class name -> :class:`PipelineSpec` of the pipelines built on this denoiser.
        presets: preset name -> settings (registered into :data:`nagkit.PRESETS`).
        tiny: tiny model name (``"tiny-…"``) -> :class:`TinyModel`.
        bench_inputs: ``bench_inputs(spec, batch, dtype) -> nagkit.bench.families.Inputs``: meta inputs of one
            denoiser call of the shapes in a ``nagkit bench`` family spec (``spec.geometry``), ``batch`` rows.
        bench_text_flops: ``bench_text_flops(model, spec) -> int``: FLOPs of the negative's pre-block text work that
            per-token ``text_linears`` patterns cannot describe (layers run on several rows per token, attention
            among the text's own tokens: Krea 2's text fusion), added to ``nagkit bench``'s analytic minimum of a
            joint-attention family; None: nothing to add.
        bench_model: ``bench_model(model) -> model``: makes the meta-device model of ``nagkit bench`` countable where
            a forward reads tensor values (HiDream's MoE routing): a FLOP-equal stand-in on that model instance only;
            None: the model as built.
        separate_cfg: the family's pipelines run CFG as two denoiser calls (conditional, then unconditional) instead
            of one call on a doubled batch (Wan, FLUX true CFG, Chroma).
        drop_padding: drop the tokens a negative's padding mask removes before packing (exact where masked keys
            get no attention weight: PixArt, Sana), so a few-word negative padded to 300 tokens costs its own tokens.
        text_ndim: dimensions of the text embeddings under ``text_arg`` (batch and tokens first), checked on a
            negative given in embedding form: 3 ``(batch, tokens, channels)``; Krea 2's tapped encoder states
            ``(batch, tokens, layers, channels)``: 4.
    """

    family: str
    model_class: type
    processors: dict[type, type[NAGProcessor]]
    select: Callable[[str, torch.nn.Module], bool]
    text_arg: str = "encoder_hidden_states"
    mask_arg: str | None = None
    timestep_arg: str = "timestep"
    timestep_max: float = 1000.0
    preset: str = ""
    notes: str = ""
    negative_keys: tuple[str, ...] = ()
    batch_dims: dict[str, int] = field(default_factory=dict)
    official_norm: str = "l1"
    official: bool = True
    plan: Callable | None = None
    prepare: Callable | None = None
    block_forwards: dict[type, Callable] = field(default_factory=dict)
    mask_packer: Callable | None = None
    window: Callable | None = None
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)
    presets: dict[str, NAGConfig] = field(default_factory=dict)
    tiny: dict[str, TinyModel] = field(default_factory=dict)
    bench_inputs: Callable | None = None
    bench_text_flops: Callable | None = None
    bench_model: Callable | None = None
    separate_cfg: bool = False
    drop_padding: bool = False
    text_ndim: int = 3

    def processor_for(self, processor: object) -> type[NAGProcessor] | None:
        """The NAG processor class that can wrap ``processor`` (by exact class, then subclass), or None."""
        found = self.processors.get(type(processor))
        if found is not None:
            return found
        for klass, nag_class in self.processors.items():
            if isinstance(processor, klass):
                return nag_class
        return None

    def in_window(self, config: NAGConfig, timestep: float) -> bool:
        """Whether a denoiser call at ``timestep`` is inside the ``start``/``end`` window."""
        if self.window is not None:
            return self.window(config, timestep)
        return config.in_window(timestep, self.timestep_max)

    def pack_mask(self, access: Any, args: tuple, kwargs: dict, mask: torch.Tensor | None, packing: Any
                  ) -> tuple[tuple, dict]:
        """Pack the mask argument of a guided call (see ``mask_packer``)."""
        if self.mask_packer is not None:
            return self.mask_packer(access, args, kwargs, mask, packing)
        from ..integration.hook import pack_text_mask

        return pack_text_mask(self.mask_arg, access, args, kwargs, mask, packing)


_REGISTRY: list[Adapter] = []
#: Supported diffusers pipelines: class name -> :class:`PipelineSpec` (filled by :func:`register_adapter`).
PIPELINES: dict[str, PipelineSpec] = {}
#: Tiny offline pipelines: name -> :class:`TinyModel` (filled by :func:`register_adapter`, in registration order).
TINY_MODELS: dict[str, TinyModel] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register a family (also a user-defined one): its adapter, pipelines, presets and tiny models.

    Later registrations win for the same denoiser class, pipeline, preset or tiny model name.
    """
    _REGISTRY.insert(0, adapter)
    PIPELINES.update(adapter.pipelines)
    for name, config in adapter.presets.items():
        register_preset(name, config)
    TINY_MODELS.update(adapter.tiny)
    return adapter


def supported_models() -> list[str]:
    """Names of the supported denoiser classes."""
    return sorted({a.model_class.__name__ for a in _REGISTRY})


def find_adapter(model: torch.nn.Module) -> Adapter | None:
    """The adapter for ``model``'s class (exact class first, then subclasses), or None."""
    for adapter in _REGISTRY:
        if type(model) is adapter.model_class:
            return adapter
    for adapter in _REGISTRY:
        if isinstance(model, adapter.model_class):
            return adapter
    return None


def find_adapter_class(model_class: type) -> Adapter | None:
    """The adapter for the denoiser class ``model_class`` (exact class first, then subclasses), or None."""
    for adapter in _REGISTRY:
        if model_class is adapter.model_class:
            return adapter
    for adapter in _REGISTRY:
        if issubclass(model_class, adapter.model_class):
            return adapter
    return None


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; raise ``TypeError`` naming its class and the supported ones."""
    adapter = find_adapter(model)
    if adapter is None:
        raise TypeError(f"nagkit does not support {type(model).__name__}; supported denoisers: "
                        f"{', '.join(supported_models())}")
    return adapter


def nag_modules(model: torch.nn.Module, adapter: Adapter) -> dict[str, torch.nn.Module]:
    """The attention modules of ``model`` that get a NAG processor, checked against the processors NAG supports."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "processor") or not hasattr(module, "set_processor"):
            continue
        if not adapter.select(name, module):
            continue
        processor = module.processor
        if adapter.processor_for(processor) is None:
            supported = ", ".join(sorted(c.__name__ for c in adapter.processors))
            raise NotImplementedError(f"{adapter.model_class.__name__}.{name} uses {type(processor).__name__}, which "
                                      f"nagkit cannot guide; supported processors here: {supported}")
        found[name] = module
    if not found:
        raise NotImplementedError(f"{type(model).__name__} has no text cross-attention module nagkit can guide")
    return found
