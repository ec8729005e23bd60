"""CLI verbs of the load pillar: ``run`` (a script under protect()) and ``convert``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any


def register(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a Python script with every model load scanned first",
        description="Run SCRIPT (or -m MODULE) with trainguard.protect() active: torch.load, "
        "pickle, numpy.load and joblib.load scan what they load and refuse payloads.",
    )
    r.add_argument("--mode", choices=("block", "warn"), default="block")
    r.add_argument("--strict", action="store_true", help="refuse medium findings too")
    r.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    r.add_argument("-m", dest="module", metavar="MODULE", help="run a module, like python -m")
    r.add_argument("target", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...]")
    r.set_defaults(handler=_run)

    c = sub.add_parser(
        "convert",
        help="convert a pickle checkpoint to safetensors plus JSON, loading it safely",
    )
    c.add_argument("src", metavar="IN")
    c.add_argument("out", metavar="OUT", help="output base name (OUT.safetensors, OUT.json)")
    c.add_argument("--policy", metavar="FILE")
    c.add_argument("--strict", action="store_true")
    c.set_defaults(handler=_convert)


def _policy(args: argparse.Namespace) -> Any:
    from trainguard.scanner import Policy

    return Policy.load(args.policy) if args.policy else None


def _run(args: argparse.Namespace) -> int:
    from trainguard.errors import UsageError
    from trainguard.loader import protect

    if not args.module and not args.target:
        raise UsageError("run needs a SCRIPT or -m MODULE")
    protect(policy=_policy(args), mode=args.mode, strict=args.strict)
    if args.module:
        sys.argv = [args.module, *args.target]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script = args.target[0]
        sys.argv = list(args.target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from trainguard.loader.convert import convert

    st, js = convert(args.src, args.out, policy=_policy(args), strict=args.strict)
    print(f"wrote {st} and {js}", file=sys.stderr)
    return 0
