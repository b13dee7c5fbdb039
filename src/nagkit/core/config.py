"""NAG settings (one dataclass) and the preset registry (each model family registers its own presets)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .operator import NORMS, validate_params

MODES = ("fast", "official")
#: Guidance methods (``NAGConfig.method``). ``"nasa"`` and ``"vsf"`` are experimental: competing attention-space
#: negative guidance methods computed on nagkit's mechanism (the negative's own text stream, the guided rows).
METHODS = ("nag", "nasa", "vsf")
#: Per-method defaults of ``scale`` and ``offset`` (used when a config is built or switched to a method without them).
#: NAG: ``nag_scale`` 5 (paper φ = 4, Flux/SD3.5, Table 5). NASA: φ = 0.25, the middle of the range [0, 0.5] the VSF
#: authors swept NASA over on SD3.5-Large-Turbo (weathon/VSF ``experiments/sweep_nasa.py``; the SNOOPI paper's own value
#: was not available to us). VSF: β = 3.5 and offset 0.1, the VSF README's SD3.5-Large-Turbo example (weathon/VSF
#: ``README.md``: ``scale=3.5, offset=0.1``).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "nag": {"scale": 5.0, "offset": 0.0},
    "nasa": {"scale": 0.25, "offset": 0.0},
    "vsf": {"scale": 3.5, "offset": 0.1},
}
# Where each experimental rule comes from, and what nagkit does differently (its mechanism: the negative is its own
# text stream, packed after the prompt's; guided rows, windows and per-sample negatives as for NAG):
#
# NASA (SNOOPI, arXiv 2412.02687; as the VSF authors ran it as a baseline, weathon/VSF ``nasa/processor.py``):
#   ``hidden_states_positive - hidden_states_negative * scale`` on the image part of the joint attention output, no
#   normalisation, before the output projection. nagkit: ``Z+ − φ·Z-`` on the guided image tokens of every layer NAG
#   guides (FLUX: double and single blocks), with nagkit's Z+/Z- (one image stream; LSE-shared image→image attention).
# VSF (arXiv 2508.10931; weathon/VSF ``src/processor.py``, ``src/sd3_pipeline.py``, ``src/flux_pipeline.py``,
#   ``comfyui/.../processor.py``, README): the negative's text tokens are appended as extra keys whose values are
#   multiplied by ``-scale`` (β) in the same attention as the prompt; an additive attention bias lowers the image
#   queries' logits on them (SD3.5: ``attn_mask[:, :img_len, -neg_len:] -= offset``; Wan README: a bias of -0.2 on
#   the negative keys); masks keep text queries from seeing the flipped copy; the negative's own text stream sees only
#   itself and the image. nagkit: the same single softmax for the image queries over [prompt text, image] ∪ [negative
#   text with values × −β, logits − offset], written as a log-sum-exp merge; text queries as in NAG (prompt text:
#   [prompt, image]; negative text: [negative, image]). Differences from the authors' code, on purpose: (1) their SD3.5
#   pipeline also appends an unflipped copy of the negative to the prompt's text (visible to the image and the prompt)
#   — not reproduced (their Wan and ComfyUI code has no such copy); (2) their Flux pipeline installs VSF in the double
#   blocks only and extrapolates the pooled CLIP embedding (``neg + 1.1·(pos − neg)``) — nagkit applies VSF in every
#   layer NAG guides (double and single blocks) and keeps NAG's modulation (the negative's text stream with the
#   negative's pooled embedding, the image with the prompt's); (3) CFG: the authors require guidance_scale 0; nagkit
#   guides only the conditional rows.
#: The NAG-only parameters and their defaults: NASA and VSF do not use them and refuse other values.
NAG_ONLY = {"tau": 2.5, "alpha": 0.25, "norm": "l1"}


@dataclass(frozen=True)
class NAGConfig:
    """Everything that shapes the guidance, validated on construction.

    Args:
        scale: NAG: ``nag_scale`` = paper φ + 1 (``≤ 1`` switches NAG off). Paper Table 5: Flux/SD3.5 φ=4 → 5, SDXL
            φ=2 → 3. NASA: φ (``Z+ − φ·Z-``). VSF: β (the negative's values times ``−β``). Default: the method's
            (:data:`METHOD_DEFAULTS`: 5.0 / 0.25 / 3.5).
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
            family differs between the two. NAG only: NASA and VSF refuse ``"official"``.
        method: the guidance rule applied in every guided attention layer (default ``"nag"``). Experimental
            alternatives, computed on the same mechanism (the negative carried as its own text stream, the same
            guided layers, rows, windows and per-sample negatives):

            * ``"nasa"`` (NASA, SNOOPI arXiv 2412.02687): ``out = Z+ − φ·Z-`` on the guided image tokens, no
              normalisation; ``scale`` is φ ≥ 0 (default 0.25; φ = 0 is off).
            * ``"vsf"`` (Value Sign Flip, arXiv 2508.10931; rule from the authors' code weathon/VSF): the image
              queries attend in ONE softmax to the prompt's keys (image and prompt text in joint attention) and the
              negative's keys, whose values are multiplied by ``−β`` and whose attention logits are lowered by
              ``offset``; text queries are unchanged (the prompt's text sees ``[prompt, image]``, the negative's text
              ``[negative, image]``). ``scale`` is β ≥ 0 (default 3.5; β = 0 switches VSF off, i.e. the plain model —
              the formula at β = 0 would still let the negative's keys take softmax weight, with zero values).

            ``tau``, ``alpha`` and ``norm`` are NAG's: with ``"nasa"``/``"vsf"`` they must keep their defaults
            (other values are refused, never silently ignored).
        offset: VSF only: the amount subtracted from the attention logits of the image queries on the negative's
            keys (the VSF SD3.5 code's ``offset``: positive = less attention to the negative). Default 0.1 for VSF,
            0 otherwise; nonzero values are refused for the other methods.
    """

    scale: float = None  # type: ignore[assignment]  # None: the method's default (METHOD_DEFAULTS), e.g. 5.0 for NAG
    tau: float = 2.5
    alpha: float = 0.25
    start: float = 0.0
    end: float = 1.0
    norm: str = "l1"
    mode: str = "fast"
    method: str = "nag"
    offset: float = None  # type: ignore[assignment]  # None: the method's default (0.1 for VSF, 0 otherwise)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("scale", "offset"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, METHOD_DEFAULTS[self.method][name])
        for name in ("scale", "tau", "alpha", "start", "end", "offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
            if math.isnan(value):
                raise ValueError(f"{name} must not be NaN")
        if self.method != "nag" and not 0 <= self.scale < math.inf:
            meaning = "phi in Z+ - phi*Z-" if self.method == "nasa" else "beta, the negative values' factor -beta"
            raise ValueError(f"scale must be a finite number >= 0 for method={self.method!r} ({meaning}; 0 is off), "
                             f"got {self.scale}")
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
        if math.isinf(self.offset):
            raise ValueError(f"offset must be finite, got {self.offset}")
        if self.method != "nag":
            for name, default in NAG_ONLY.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name} is a NAG parameter: method={self.method!r} does not use it (its "
                                     f"parameters are scale{' and offset' if self.method == 'vsf' else ''}); leave "
                                     f"{name} at its default {default!r}")
            if self.mode != "fast":
                raise ValueError(f"mode={self.mode!r} reproduces the official NAG code: method={self.method!r} has "
                                 "no official mode in nagkit; use mode='fast'")
        if self.method != "vsf" and self.offset != 0:
            raise ValueError(f"offset is a VSF parameter: method={self.method!r} does not use it; leave it at 0")

    @property
    def is_off(self) -> bool:
        """True when the settings make the guidance an exact identity: NAG ``scale ≤ 1`` or ``alpha == 0``; NASA
        ``scale == 0`` (φ); VSF ``scale == 0`` (β = 0 is defined as off)."""
        if self.method != "nag":
            return self.scale == 0
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
        """A copy with the given non-None fields replaced (and validated).

        Switching ``method`` does not carry the previous method's parameters over: ``scale`` and ``offset`` not
        given take the new method's defaults (:data:`METHOD_DEFAULTS`), and switching to NASA/VSF resets ``tau``,
        ``alpha`` and ``norm`` (NAG's, unused there) to their defaults and ``mode`` to ``"fast"`` unless given.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        method = changes.get("method", self.method)
        if method != self.method:
            changes.setdefault("scale", None)
            changes.setdefault("offset", None)
            if method != "nag":
                for name, default in NAG_ONLY.items():
                    changes.setdefault(name, default)
                changes.setdefault("mode", "fast")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict, e.g. for JSON sidecars. ``method`` and ``offset`` appear only for the experimental methods
        (a NAG config's dict is what it was before they existed)."""
        data = asdict(self)
        if self.method == "nag":
            del data["method"], data["offset"]
        return data


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
