"""Which model the command line was given, what it is before any weights load, and loading it.

A model is ``embedded`` (the trained toy model shipped in the package), a built-in tiny model (``tiny-sdxl``, …), a
local diffusers pipeline folder, or a hub id (``org/name``). :func:`describe` reads only configuration files
(``model_index.json``, a component's ``config.json``), so every check that depends on the model runs before the
weights load; :func:`load_pipeline` then loads them.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .common import EMBEDDED, EMBEDDED_MODELS, CLIError

#: seconds to wait for the hub's TCP handshake before calling it unreachable
HUB_PROBE_TIMEOUT = 3.0


def builtin_models() -> list[str]:
    """``embedded``, the tiny models' names (``nagkit.adapters.base.TINY_MODELS``) and ``embedded-teacher``."""
    from ..adapters.base import TINY_MODELS

    return [EMBEDDED, *TINY_MODELS, *EMBEDDED_MODELS[1:]]


def is_builtin(model: str) -> bool:
    """Whether ``model`` names a model built into nagkit (nothing to download)."""
    return model in EMBEDDED_MODELS or model.startswith("tiny-") and model in builtin_models()


@dataclass
class ModelInfo:
    """A model as the command line sees it before loading weights.

    Attributes:
        name: as given.
        kind: ``"builtin"``, ``"local"`` or ``"hub"``.
        index: the pipeline's ``model_index.json``.
        local_files_only: load from the Hugging Face cache only (the hub is unreachable or ``HF_HUB_OFFLINE``).
        pipe: the built pipeline of a built-in model (building it is cheap; loading reuses it).
    """

    name: str
    kind: str
    index: dict[str, Any]
    local_files_only: bool = False
    pipe: Any = None
    _configs: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @property
    def pipeline(self) -> str:
        """The pipeline class name."""
        return str(self.index.get("_class_name", "?"))

    def component_class(self, component: str) -> str | None:
        """The class name of a component in ``model_index.json`` (None when absent)."""
        entry = self.index.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            return str(entry[1])
        return None

    def config(self, component: str) -> dict[str, Any] | None:
        """A component's ``config.json`` (None when the model has no such component or file)."""
        if component not in self._configs:
            self._configs[component] = self._read_config(component)
        return self._configs[component]

    def _read_config(self, component: str) -> dict[str, Any] | None:
        if self.component_class(component) is None:
            return None
        if self.kind == "builtin":
            module = getattr(self.pipe, component, None)
            return None if module is None else dict(getattr(module, "config", {}) or {})
        if self.kind == "local":
            path = Path(self.name).expanduser() / component / "config.json"
            return _read_json(path) if path.is_file() else None
        return _hub_json(self.name, f"{component}/config.json", self.local_files_only, required=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read {path}: {err}") from None


def _looks_local(model: str) -> bool:
    """A path rather than a hub id (``org/name``)."""
    return (model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") != 1
            or any(part in ("", ".", "..") for part in model.split("/")))


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """One TCP handshake with the hub endpoint (``HF_ENDPOINT``, default huggingface.co): seconds, not the minute of
    retries a download attempt takes on a machine without network."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_json(repo: str, filename: str, local_files_only: bool, required: bool = True) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(repo, filename, local_files_only=local_files_only)
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:
        if not required:
            return None
        where = "in the local Hugging Face cache" if local_files_only else "on the hub"
        raise CLIError(f"{repo}: no {filename} {where} (is it a diffusers pipeline?)") from err
    except HfHubHTTPError as err:
        if not required:
            return None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"{repo}: cannot fetch {filename} from the hub: {reason}") from None
    except ValueError as err:  # invalid repo id
        raise CLIError(f"{repo}: {err}") from None
    return _read_json(Path(path))


def _builtin_index(pipe: Any) -> dict[str, Any]:
    index: dict[str, Any] = {"_class_name": type(pipe).__name__}
    index.update({k: [type(v).__module__.split(".")[0], type(v).__name__] for k, v in pipe.components.items()
                  if v is not None})
    index.update({k: v for k, v in pipe.config.items()  # registered flags such as FLUX.2 Klein's is_distilled
                  if k not in pipe.components and not k.startswith("_") and isinstance(v, (bool, int, float, str))})
    return index


def build_builtin(model: str) -> Any:
    """Build a built-in model's pipeline (CPU, float32)."""
    if model in EMBEDDED_MODELS:
        from ..toy.model import load_embedded_pipeline, load_student_pipeline

        try:  # ``embedded``: the few-step student (4 steps, no CFG); ``embedded-teacher``: the many-step teacher
            return load_student_pipeline() if model == EMBEDDED else load_embedded_pipeline()
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    from ..adapters.base import TINY_MODELS

    return TINY_MODELS[model].builder(seed=0)


def describe(model: str) -> ModelInfo:
    """Find ``model`` and read its ``model_index.json``, without loading weights.

    Args:
        model: ``embedded``, a tiny model name, a local pipeline folder, or a hub id.

    Returns:
        The :class:`ModelInfo`.

    Raises:
        CLIError: no such folder, a folder without ``model_index.json``, an unreachable hub with the model not
            cached, or a hub id without a pipeline.
    """
    if is_builtin(model):
        pipe = build_builtin(model)
        return ModelInfo(model, "builtin", _builtin_index(pipe), pipe=pipe)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{model} is a file; a model is a diffusers pipeline folder (with model_index.json), "
                           "a hub id (org/name), 'embedded' or a tiny-* model")
        index = path / "model_index.json"
        if not index.is_file():
            raise CLIError(f"{model} has no model_index.json: not a diffusers pipeline folder")
        return ModelInfo(model, "local", _read_json(index))
    if _looks_local(model):
        hint = f"; built-in models: {', '.join(builtin_models())}" if model.startswith("tiny") else ""
        raise CLIError(f"no such folder: {model} (a model is a local pipeline folder, a hub id like org/name, "
                       f"'embedded' or a tiny-* model{hint})")
    local_only = hub_offline()
    if not local_only and not hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
        if not isinstance(cached, str):
            raise CLIError(f"cannot reach the model hub and {model} is not in the local Hugging Face cache; pass a "
                           "local folder, or set HF_HUB_OFFLINE=1 with the model in the cache")
        local_only = True
    return ModelInfo(model, "hub", _hub_json(model, "model_index.json", local_only) or {},
                     local_files_only=local_only)


def load_pipeline(info: ModelInfo, dtype: str, device: str, offload: bool) -> Any:
    """Load the pipeline's weights (a built-in model's pipeline is reused) onto ``device``.

    Args:
        info: from :func:`describe`.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: torch device string.
        offload: ``enable_model_cpu_offload`` instead of moving the whole pipeline.

    Returns:
        The pipeline.

    Raises:
        CLIError: when loading fails (one line with the reason).
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    if info.kind == "builtin":
        pipe = info.pipe
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(info.name, dtype=torch_dtype,
                                                     local_files_only=info.local_files_only)
        except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CLIError(f"cannot load {info.name!r}: {reason}") from None
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ------------------------------------------------------------------------------------------------ geometry
def vae_factors(vae: dict[str, Any] | None) -> tuple[int, int]:
    """``(spatial, temporal)`` downscale factors of a VAE from its config (diffusers' own formulas; ``(8, 1)``
    when unknown)."""
    if not vae:
        return 8, 1
    if "temperal_downsample" in vae:  # AutoencoderKLWan
        down = list(vae["temperal_downsample"])
        return 2 ** len(down), 2 ** sum(bool(d) for d in down)
    if "spatio_temporal_scaling" in vae:  # AutoencoderKLLTXVideo / AutoencoderKLLTX2Video
        scaled = 2 ** sum(bool(s) for s in vae["spatio_temporal_scaling"])
        return (vae.get("spatial_compression_ratio") or vae.get("patch_size", 1) * scaled,
                vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * scaled)
    if vae.get("spatial_compression_ratio") and vae.get("temporal_compression_ratio"):  # HunyuanVideo (1.5)
        return int(vae["spatial_compression_ratio"]), int(vae["temporal_compression_ratio"])
    blocks = vae.get("encoder_block_out_channels") or vae.get("block_out_channels")
    return (2 ** (len(blocks) - 1) if blocks else 8), 1
