"""``trainguard run``: a Python script (or ``-m MODULE``) with every model load scanned first.

The script runs in this process under :func:`trainguard.protect`, as
``python SCRIPT`` would run it.  Its own exit status passes through
(``sys.exit(N)``); a load that protect() refuses exits 1 (a finding); any
other exception the script raises is printed with its traceback, as Python
would, and exits 2: a crash must not read as "findings".
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback

from trainguard.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    Subparsers,
    add_verdict,
    load_policy,
    loader_strict,
)
from trainguard.errors import TrainguardError, UsageError


def register(sub: Subparsers) -> None:
    r = sub.add_parser(
        "run",
        help="run a Python script with every model load scanned first",
        description="Run SCRIPT (or -m MODULE) with trainguard.protect() active: torch.load, "
        "pickle, numpy.load and joblib.load scan what they load and refuse payloads. Exit: "
        "the script's own, 1 a refused load, 2 the script raised.",
    )
    r.add_argument(
        "--mode",
        choices=("block", "warn"),
        default="block",
        help="block: refuse a load with findings (default); warn: log them and load",
    )
    add_verdict(r)
    r.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    r.add_argument("-m", dest="module", metavar="MODULE", help="run a module, like python -m")
    r.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        metavar="SCRIPT [ARGS...]",
        help="the script and its own arguments (or, with -m, the module's arguments)",
    )
    r.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from trainguard.loader.protect import protect

    if not args.module and not args.target:
        raise UsageError("run needs a SCRIPT or -m MODULE")
    strict = loader_strict(args)
    protect(policy=load_policy(args.policy), mode=args.mode, strict=strict)
    try:
        if args.module:
            sys.argv = [args.module, *args.target]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            script = args.target[0]
            sys.argv = list(args.target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
    except TrainguardError:
        raise  # a refused load (exit 1) or trainguard's own error: main() says which
    except Exception as exc:  # the script's own error, shown as Python would
        traceback.print_exception(exc, file=sys.stderr)
        name = args.module or args.target[0]
        print(f"trainguard: {name} raised {type(exc).__name__} (above)", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
