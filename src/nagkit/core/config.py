"""NAG settings (one dataclass) and the preset registry (each model family registers its own presets)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .operator import NORMS, validate_params

MODES = ("fast", "official")


@dataclass(frozen=True)
class NAGConfig:
    """Everything that shapes the guidance, validated on construction.

    Args:
        scale: ``nag_scale`` = paper φ + 1 (``≤ 1`` switches NAG off). Paper Table 5: Flux/SD3.5 φ=4 → 5, SDXL φ=2 → 3.
        tau: cap τ on the per-token norm ratio ``‖Z~‖/‖Z+‖``.
        alpha: blend α between the capped guidance and ``Z+``.
        start: schedule position where NAG switches on (0 = first step).
        end: schedule position where NAG switches off (1 = last step). The position of a denoiser call is
            ``u = 1 − t/T`` with ``t`` its timestep and ``T`` the training horizon, so ``end`` is exactly the
            official diffusers ``nag_end`` (NAG on while ``t ≥ (1 − nag_end)·1000``; UNet pipelines:
            ``t ≥ floor((1 − nag_end)·999)``) and, for flow-matching models whose sigma is ``t/1000``, ComfyUI's
            ``nag_sigma_end`` is ``1 − end``.
        norm: ``"l1"`` (paper) or ``"l2"`` (the official diffusers Flux processor; ``mode="official"`` picks it for
            Flux unless a norm is given).
        mode: ``"fast"`` (default: one image stream everywhere) or ``"official"`` (reproduce the official diffusers
            code: on Flux, single blocks carry a second image copy under the negative's modulation). Only the Flux
            family differs between the two.
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    start: float = 0.0
    end: float = 1.0
    norm: str = "l1"
    mode: str = "fast"

    def __post_init__(self) -> None:
        for name in ("scale", "tau", "alpha", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
            if math.isnan(value):
                raise ValueError(f"{name} must not be NaN")
        validate_params(self.scale, self.tau, self.alpha)
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"start must be in [0, 1] (fraction of the denoising schedule), got {self.start}")
        if not 0.0 <= self.end <= 1.0:
            raise ValueError(f"end must be in [0, 1] (fraction of the denoising schedule), got {self.end}")
        if self.start > self.end:
            raise ValueError(f"start must be <= end, got start={self.start}, end={self.end}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def is_off(self) -> bool:
        """True when the settings make NAG an exact identity (``scale ≤ 1`` or ``alpha == 0``)."""
        return self.scale <= 1 or self.alpha == 0

    def in_window(self, timestep: float, horizon: float = 1000.0, floor: bool = False) -> bool:
        """Whether a denoiser call at ``timestep`` is guided.

        The call sits at schedule position ``u = 1 − t/horizon`` and is guided when ``start ≤ u ≤ end``, i.e.
        ``(1 − end)·horizon ≤ t ≤ (1 − start)·horizon``. ``floor=True`` rounds the lower bound down, which is the
        official UNet pipelines' ``t ≥ floor((1 − nag_end)·999)`` (horizon 999).

        Args:
            timestep: the call's timestep ``t``.
            horizon: the training horizon ``T`` of the model family (1000, or 999 for UNet pipelines).
            floor: round the thresholds outward to integers.

        Returns:
            True when NAG is on for this call.
        """
        low, high = (1.0 - self.end) * horizon, (1.0 - self.start) * horizon
        if floor:
            low, high = math.floor(low), math.ceil(high)
        return low <= timestep <= high

    def with_updates(self, **changes: float | str | None) -> NAGConfig:
        """A copy with the given non-None fields replaced (and validated)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """Plain dict, e.g. for JSON sidecars."""
        return asdict(self)


#: Presets by name: the defaults of each model family, registered by the family's module in ``nagkit.adapters`` (with
#: where the values come from: the official code, the paper) and, once :mod:`nagkit.toy` is imported, the embedded toy
#: model's. ``scale`` is ``nag_scale`` (= paper φ + 1).
PRESETS: dict[str, NAGConfig] = {}


def register_preset(name: str, config: NAGConfig) -> NAGConfig:
    """Register (or replace) the preset ``name``; return ``config``.

    Raises:
        TypeError: when ``config`` is not a :class:`NAGConfig`.
    """
    if not isinstance(config, NAGConfig):
        raise TypeError(f"preset {name!r} must be a NAGConfig, got {type(config).__name__}")
    PRESETS[name] = config
    return config


def get_preset(name: str) -> NAGConfig:
    """Return the preset ``name``; raise ``KeyError`` listing the known presets.

    The families' presets are registered by their adapter modules, imported here first (``import nagkit`` loads
    them lazily)."""
    import nagkit.adapters  # noqa: F401  (registers every family's presets)

    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
