"""Full-size denoiser families for the benchmarks: published configs (JSON files in ``configs/``), built on the meta
device, and meta inputs of the shapes a real pipeline call would pass.

Each JSON file holds the denoiser's ``config.json`` values (``config``), its diffusers class (``class``), the default
geometry of a generation (resolution, frames, VAE factors, text tokens and width) and which modules are per-token text
layers (``text_modules``, or ``text_linears`` and ``joint_attention`` patterns for MM-DiTs: the work a negative's tokens
need at least, for the analytic minimum). No weights are ever loaded: models are built
with ``__init__`` under ``torch.device("meta")``. The meta inputs of a call come from the family's module in
:mod:`nagkit.adapters` (``Adapter.bench_inputs``, found by the diffusers class): :func:`build_inputs` dispatches to it.

An optional ``time`` object holds the reduced config of time mode (:mod:`nagkit.bench.timing`): ``config`` and
``geometry`` values that replace the published ones (fewer blocks; widths and token counts divided by the same
factor where one full block would not fit the time budget on a CPU), and a ``note`` for the report.
:meth:`FamilySpec.for_time` applies it and lists every change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import torch

CONFIG_PACKAGE = "nagkit.bench"  # configs/*.json ship as package data


@dataclass(frozen=True)
class Geometry:
    """The shapes of one denoiser call.

    Attributes:
        height, width: image size in pixels.
        frames: video frames (None for image models).
        vae_scale: spatial VAE downsampling factor.
        vae_scale_t: temporal VAE factor (video), latent frames ``(frames − 1) // vae_scale_t + 1``.
        patch: spatial patch size of the denoiser (1 for UNets).
        latent_channels: channels of the denoiser's latent input (Wan I2V: 16 noise + 20 condition = 36).
        text_tokens: prompt tokens (the pipeline's padded ``max_sequence_length``).
        text_dim: text embedding width.
        negative_tokens: NAG negative tokens (default: as many as the prompt).
        batch: prompts per call (the conditional batch).
        image_tokens: image-context tokens (Wan I2V CLIP tokens), 0 if none.
        image_dim: width of the image-context embeddings.
        pooled_dim: width of a pooled text embedding (SDXL ``text_embeds``, SD3/Flux ``pooled_projections``), or 0.
        time_ids: SDXL ``time_ids`` length, or 0.
        mask: the family takes a text padding mask (``encoder_attention_mask``; Chroma: ``attention_mask`` over
            ``[text | image]``, the pipeline's text mask extended with ones over the image tokens).
        text_encoder: name of the text encoder, for reports.
    """

    height: int
    width: int
    vae_scale: int
    latent_channels: int
    text_tokens: int
    text_dim: int
    frames: int | None = None
    vae_scale_t: int | None = None
    patch: int = 1
    negative_tokens: int | None = None
    batch: int = 1
    image_tokens: int = 0
    image_dim: int = 0
    pooled_dim: int = 0
    time_ids: int = 0
    mask: bool = False
    text_encoder: str = ""

    @property
    def negative_length(self) -> int:
        """Number of negative tokens (the prompt's length unless set)."""
        return self.negative_tokens if self.negative_tokens is not None else self.text_tokens

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent height and width."""
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def latent_frames(self) -> int | None:
        """Latent frames of a video (None for images)."""
        if self.frames is None:
            return None
        return (self.frames - 1) // (self.vae_scale_t or 1) + 1

    @property
    def image_query_tokens(self) -> int:
        """Image (latent) tokens the denoiser's transformer blocks see at full resolution (after patching)."""
        h, w = self.latent_hw
        tokens = (h // self.patch) * (w // self.patch)
        return tokens * (self.latent_frames or 1)

    def validate(self) -> None:
        """Check that the shapes make a valid call.

        Raises:
            ValueError: when the resolution does not fit the VAE and patch factors, the frame count the temporal VAE
                factor, or a token count or the batch is below 1.
        """
        step = self.vae_scale * self.patch
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step} (VAE factor {self.vae_scale} x patch "
                             f"{self.patch}), got {self.height}x{self.width}")
        if self.frames is not None and self.vae_scale_t and (self.frames - 1) % self.vae_scale_t:
            raise ValueError(f"frames must be 1 + a multiple of {self.vae_scale_t}, got {self.frames}")
        if min(self.text_tokens, self.negative_length, self.batch) < 1:
            raise ValueError("text tokens, negative tokens and batch must be >= 1")


@dataclass(frozen=True)
class FamilySpec:
    """One benchmark family: a diffusers denoiser class, its published config and a default call geometry.

    Attributes:
        name: short name used by ``nagkit bench --family``.
        title: human-readable name for reports.
        source: where the config values come from.
        model_class: name of the diffusers class.
        attention: ``"cross"`` (text cross-attention) or ``"joint"`` (MM-DiT joint attention).
        inputs: the family's input kind (``unet``, ``wan``, ``pixart``, ``sana``, ``sd3``, ``flux``, ``chroma``), read
            by time mode and the in-repo official references; the meta inputs themselves come from the adapter
            registered for ``model_class`` (:func:`build_inputs`).
        config: keyword arguments of the class's ``__init__`` (the published ``config.json`` values).
        geometry: default call geometry.
        text_modules: dotted names of per-token text layers that NAG runs again on the negative's tokens
            (cross-attention families; the attention modules' own key/value projections are found separately).
        text_linears: joint-attention families: name patterns (``fnmatch``) of the ``nn.Linear`` layers that every
            text token goes through (its own stream), for the analytic minimum.
        joint_attention: joint-attention families: name patterns of the joint attention modules.
        time: the reduced config of time mode: ``{"config": {...}, "geometry": {...}, "note": "..."}`` (all
            optional), see :meth:`for_time`.
    """

    name: str
    title: str
    source: str
    model_class: str
    attention: str
    inputs: str
    config: dict[str, Any]
    geometry: Geometry
    text_modules: tuple[str, ...] = field(default_factory=tuple)
    text_linears: tuple[str, ...] = field(default_factory=tuple)
    joint_attention: tuple[str, ...] = field(default_factory=tuple)
    time: dict[str, Any] = field(default_factory=dict)

    def for_time(self) -> tuple[FamilySpec, list[str]]:
        """The reduced family that time mode runs, and what was reduced.

        The ``time`` object's ``config`` and ``geometry`` values replace the published ones; the spec's ``time`` is
        emptied (the reduced spec is final).

        Returns:
            ``(reduced spec, reductions)``: one ``"key: published → reduced"`` line per changed config value, the
            geometry changes (size, frames, image, text and image-context tokens; the text width follows the config)
            and the ``note``; ``["none"]`` when nothing changed.
        """
        config = {**self.config, **self.time.get("config", {})}
        reduced = replace(self, config=config, geometry=replace(self.geometry, **self.time.get("geometry", {})),
                          time={})
        lines = [f"{key}: {_short(self.config.get(key))} → {_short(value)}"
                 for key, value in self.time.get("config", {}).items() if self.config.get(key) != value]
        old, new = self.geometry, reduced.geometry
        if (old.height, old.width, old.frames) != (new.height, new.width, new.frames):
            lines.append(f"size: {_size(old)} → {_size(new)} (image tokens {old.image_query_tokens:,} → "
                         f"{new.image_query_tokens:,})")
        for key, label in (("text_tokens", "text tokens"), ("image_tokens", "image-context tokens")):
            if getattr(old, key) != getattr(new, key):
                lines.append(f"{label}: {getattr(old, key)} → {getattr(new, key)}")
        if self.time.get("note"):
            lines.append(str(self.time["note"]))
        return reduced, lines or ["none"]

    def with_geometry(self, **changes: Any) -> FamilySpec:
        """A copy with some geometry fields replaced.

        Args:
            **changes: :class:`Geometry` fields (``height``, ``width``, ``frames``, ``negative_tokens``, ``batch``…);
                None values are ignored, and ``frames`` is ignored for image families.

        Returns:
            The new :class:`FamilySpec`.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        if self.geometry.frames is None:
            changes.pop("frames", None)
        return replace(self, geometry=replace(self.geometry, **changes))

    @property
    def is_video(self) -> bool:
        """True for video families (a frame count)."""
        return self.geometry.frames is not None


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _size(g: Geometry) -> str:
    size = f"{g.width}×{g.height}"
    return size + f"×{g.frames}f" if g.frames else size


def _spec_from_json(data: dict[str, Any]) -> FamilySpec:
    geometry = Geometry(**data["geometry"])
    return FamilySpec(name=data["name"], title=data["title"], source=data["source"], model_class=data["class"],
                      attention=data["attention"], inputs=data["inputs"], config=dict(data["config"]),
                      geometry=geometry, text_modules=tuple(data.get("text_modules", ())),
                      text_linears=tuple(data.get("text_linears", ())),
                      joint_attention=tuple(data.get("joint_attention", ())), time=dict(data.get("time", {})))


def load_families() -> dict[str, FamilySpec]:
    """All families shipped in ``nagkit/bench/configs``, in a fixed report order.

    Returns:
        ``{name: FamilySpec}``.
    """
    order = ["sd15", "sdxl", "wan21-t2v-14b", "wan21-i2v-14b", "pixart-sigma", "sana-1.6b", "sd35-large", "flux1-dev",
             "chroma1-hd"]
    specs = {}
    for entry in (resources.files(CONFIG_PACKAGE) / "configs").iterdir():
        if entry.name.endswith(".json"):
            spec = _spec_from_json(json.loads(entry.read_text(encoding="utf-8")))
            specs[spec.name] = spec
    ranked = sorted(specs, key=lambda n: (order.index(n) if n in order else len(order), n))
    return {name: specs[name] for name in ranked}


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def build_model(spec: FamilySpec, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Instantiate the family's denoiser on the meta device (no memory, no weights) in ``dtype``, in eval mode.

    ``from_config`` runs the class's ``__init__`` under ``torch.device("meta")``; config keys that this diffusers
    version does not take (e.g. PixArt's ``double_self_attention``) are ignored as when loading the published model.

    Args:
        spec: the family.
        dtype: parameter dtype (bf16 as deployed; FLOP counts do not depend on it).

    Returns:
        The meta-device model (passed through the family's ``Adapter.bench_model`` when it has one: HiDream's MoE
        routing reads values, which meta tensors do not have).
    """
    import diffusers

    from ..adapters.base import find_adapter_class

    cls = getattr(diffusers, spec.model_class)
    with _quiet_diffusers(), torch.device("meta"):
        model = cls.from_config(spec.config)  # ignores keys a class version does not take
        model = model.to(dtype)
    adapter = find_adapter_class(cls)
    if adapter is not None and adapter.bench_model is not None:
        model = adapter.bench_model(model)
    return model.eval()


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


@dataclass
class Inputs:
    """Meta inputs of one denoiser call.

    Attributes:
        kwargs: keyword arguments of the denoiser's forward (the prompt's text under ``text_arg``).
        text_arg: the argument holding the text embeddings.
        mask_arg: the argument holding the text padding mask, or None.
        negative: the negative's counterparts for ``nagkit.apply(model, negative=...)``.
        real: keys (of ``kwargs`` and ``negative``) whose tensors are real values the forward reads (Qwen-Image
            2.1's ``img_mask`` token layout): the time mode keeps them as built instead of making up values.
    """

    kwargs: dict[str, Any]
    text_arg: str = "encoder_hidden_states"
    mask_arg: str | None = None
    negative: dict[str, torch.Tensor] = field(default_factory=dict)
    real: tuple[str, ...] = ()

    def with_text(self, text: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """The forward kwargs with the text (and mask) replaced, e.g. by a packed ``[positive | negative]`` text.

        Args:
            text: the new text embeddings.
            mask: the new text mask, or None to keep the current one.

        Returns:
            A new kwargs dict.
        """
        kwargs = dict(self.kwargs)
        kwargs[self.text_arg] = text
        if self.mask_arg is not None and mask is not None:
            kwargs[self.mask_arg] = mask
        return kwargs


@dataclass(frozen=True)
class CallBase:
    """What the meta inputs of every family share, for the families' ``bench_inputs`` builders.

    Attributes:
        geometry: the family's geometry.
        batch: rows of the call.
        latent_hw: latent height and width.
        text: the prompt's text embeddings ``(batch, text_tokens, text_dim)``.
        timestep: ``(batch,)`` float32 timesteps.
        negative: the negative's text embeddings ``{"encoder_hidden_states": (geometry.batch, negative_length,
            text_dim)}`` (families add their own keys).
        dtype: dtype of the float inputs.
    """

    geometry: Geometry
    batch: int
    latent_hw: tuple[int, int]
    text: torch.Tensor
    timestep: torch.Tensor
    negative: dict[str, torch.Tensor]
    dtype: torch.dtype

    def meta(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An empty meta tensor of ``shape`` (in the call's float dtype unless ``dtype`` is given)."""
        return _meta(*shape, dtype=self.dtype if dtype is None else dtype)


def call_base(spec: FamilySpec, batch: int, dtype: torch.dtype) -> CallBase:
    """The shared part of a family's meta inputs (see :class:`CallBase`).

    Args:
        spec: the family.
        batch: rows of the call.
        dtype: dtype of the float inputs.

    Returns:
        The :class:`CallBase`.
    """
    g = spec.geometry
    text = _meta(batch, g.text_tokens, g.text_dim, dtype=dtype)
    negative = {"encoder_hidden_states": _meta(g.batch, g.negative_length, g.text_dim, dtype=dtype)}
    return CallBase(geometry=g, batch=batch, latent_hw=g.latent_hw, text=text,
                    timestep=_meta(batch, dtype=torch.float32), negative=negative, dtype=dtype)


def build_inputs(spec: FamilySpec, batch: int | None = None, dtype: torch.dtype = torch.bfloat16) -> Inputs:
    """Meta inputs for one call of the family's denoiser, and the matching negative text.

    The inputs come from the ``bench_inputs`` builder of the nagkit adapter registered for ``spec.model_class`` (the
    family's module in :mod:`nagkit.adapters`).

    Args:
        spec: the family (its geometry gives every shape).
        batch: rows of the call (default: ``spec.geometry.batch``); CFG calls pass twice the prompt batch.
        dtype: dtype of the float inputs.

    Returns:
        :class:`Inputs` for ``model(**inputs.kwargs)``.

    Raises:
        ValueError: when no registered family supports ``spec.model_class`` or it has no meta-input builder.
    """
    import diffusers

    from ..adapters.base import find_adapter_class

    spec.geometry.validate()
    model_class = getattr(diffusers, spec.model_class, None)
    adapter = find_adapter_class(model_class) if isinstance(model_class, type) else None
    if adapter is None or adapter.bench_inputs is None:
        raise ValueError(f"no meta-input builder for family {spec.name}: no nagkit family with bench_inputs supports "
                         f"{spec.model_class}")
    return adapter.bench_inputs(spec, batch or spec.geometry.batch, dtype)


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta tensors).

    Args:
        model: any module.

    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters())
