"""``nagkit info MODEL``: does NAG support this model, and how (reads configuration files only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .models import ModelInfo, describe


def support_report(info: ModelInfo) -> dict[str, Any]:
    """Whether and how NAG supports a model, from its ``model_index.json``.

    Args:
        info: from :func:`nagkit.cli.models.describe`.

    Returns:
        ``{"model", "pipeline", "supported", "denoisers"}`` plus, when supported, ``"family"``, ``"how"`` and the
        default ``"preset"`` (name and values); else ``"reason"``, ``"supported_pipelines"`` and
        ``"supported_denoisers"``.
    """
    from ..adapters import base as adapters
    from ..integration.pipelines import PIPELINES

    spec = PIPELINES.get(info.pipeline)
    denoisers = {name: klass for name in ("unet", "transformer", "transformer_2")
                 if (klass := info.component_class(name)) is not None}
    families = {name: next((a for a in adapters._REGISTRY if a.model_class.__name__ == klass), None)
                for name, klass in denoisers.items()}
    supported = spec is not None and bool(families) and all(a is not None for a in families.values())
    report: dict[str, Any] = {"model": info.name, "pipeline": info.pipeline, "supported": supported,
                              "denoisers": denoisers}
    if supported:
        from ..core.config import get_preset
        from .generate import default_preset

        first = next(iter(families.values()))
        preset = default_preset(info, spec)
        report["family"] = first.family
        report["how"] = first.notes
        report["preset"] = {"name": preset, **get_preset(preset).to_dict()}
        report["official_mode"] = first.official
    else:
        from ..adapters import supported_models

        report["reason"] = (f"{info.pipeline} is not a supported pipeline" if spec is None else
                            "its denoiser is not supported")
        report["supported_pipelines"] = sorted(PIPELINES)
        report["supported_denoisers"] = supported_models()
    return report


def cmd_info(args: argparse.Namespace) -> int:
    """Print the support report of ``args.model`` (``--json``: as JSON). Exit status 1 when unsupported."""
    from .common import quiet_libraries

    quiet_libraries()
    report = support_report(describe(args.model))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["supported"] else 1
    if report["supported"]:
        p = report["preset"]
        print(f"{args.model}: supported ({report['pipeline']}, family '{report['family']}')")
        print(f"  how: {report['how']}")
        print(f"  default preset '{p['name']}': scale={p['scale']} tau={p['tau']} alpha={p['alpha']} "
              f"start={p['start']} end={p['end']}")
        if not report["official_mode"]:
            print("  --mode official: not available (no official NAG implementation for this family)")
        return 0
    print(f"{args.model}: not supported: {report['reason']} ({report['pipeline']}, denoisers: "
          f"{report['denoisers'] or 'none'})")
    print(f"  supported pipelines: {', '.join(report['supported_pipelines'])}")
    return 1
