"""``nagkit demo``: the embedded few-step student, no guidance / CFG / NAG at 1, 2, 4 and 8 steps, one titled image
grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, quiet_libraries, say


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``nagkit demo``: every option and both output paths are checked before the model loads.

    Args:
        args: parsed ``demo`` arguments.

    Returns:
        The exit status (0).
    """
    if args.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {args.seeds}")
    quiet_libraries()
    from ..toy.data import parse_caption
    from ..toy.demo import (
        DEMO_CFG_SCALE,
        DEMO_NEGATIVE,
        DEMO_PROMPT,
        check_demo_outputs,
        demo_methods,
        format_demo,
        run_demo,
    )
    from ..toy.evaluate import parse_negative

    prompt = DEMO_PROMPT if args.prompt is None else args.prompt
    negative = DEMO_NEGATIVE if args.negative is None else args.negative
    cfg_scale = DEMO_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    try:
        parse_negative(negative)
        parse_caption(prompt)
    except ValueError as err:
        raise CLIError(f"{err} (the embedded model knows the toy grammar: see `nagkit demo --help`)") from None
    try:
        demo_methods(cfg_scale, args.nag_scale, args.nag_tau, args.nag_alpha)
        check_demo_outputs(args.out, args.json)
    except ValueError as err:
        raise CLIError(str(err)) from None
    say("loading the embedded model (the few-step student) ...", args.quiet)
    try:
        result = run_demo(args.out, prompt, negative, seeds=args.seeds, cfg_scale=cfg_scale,
                          nag_scale=args.nag_scale, nag_tau=args.nag_tau, nag_alpha=args.nag_alpha,
                          progress=not args.quiet)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    print(format_demo(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(args.json)
    return 0
