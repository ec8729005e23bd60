"""``trainguard demo``: the 2024 training-sabotage incident, played end to end on the CPU."""

from __future__ import annotations

import argparse

from trainguard.cli._common import Subparsers


def register(sub: Subparsers) -> None:
    d = sub.add_parser(
        "demo",
        help="play the training-sabotage incident end to end",
        description="Seven acts, each the real trainguard command a user would run, on files "
        "and a training run made in a temporary folder: scan a checkpoint store, protect a "
        "load, verify the environment, watch a sabotaged run, replay it, diff a checkpoint, "
        "report. Payloads only create a canary file. Exit 0 only if every act caught what "
        "it planted and flagged nothing clean.",
    )
    d.add_argument("--keep", metavar="DIR", help="work in DIR and keep everything (report.html...)")
    d.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from trainguard.demo import run_demo

    return run_demo(keep=args.keep)
