"""CLI verb of the explain pillar: ``report``, a watched run's story from its ledger."""

from __future__ import annotations

import argparse
import os
import sys

from trainguard.cli._common import (
    Subparsers,
    add_ledger,
    add_run,
    open_ledger,
    public_key,
    run_id,
    write_output,
)
from trainguard.errors import UsageError


def register(sub: Subparsers) -> None:
    r = sub.add_parser(
        "report",
        help="a watched run's timeline, alerts, ledger verification and checkpoint diffs",
        description="Read a run from its ledger and write one report: the timeline (loss, "
        "gradient norm, step time per rank) with the alert steps marked, the alerts with "
        "their evidence, the ledger's verification, the environment and signature status, "
        "and checkpoint diffs around the flagged steps. HTML is one self-contained page "
        "that works offline. Exit 0 no alert and the ledger verified, 1 alerts or a failed "
        "verification, 2 error.",
    )
    add_run(r)
    add_ledger(r)
    r.add_argument(
        "-f",
        "--format",
        choices=("html", "text", "json"),
        help="default: html with -o FILE (json for *.json, text for *.txt), text on stdout",
    )
    r.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    r.add_argument("--key", metavar="PUBLIC.pem", help="check the ledger's signed heads")
    r.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where the run's recorded checkpoints are (only files inside it are opened)",
    )
    r.add_argument(
        "--diff",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="also diff these two checkpoints (repeatable)",
    )
    r.add_argument("--no-diffs", action="store_true", help="skip checkpoint diffs")
    r.set_defaults(handler=_report)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if not args.output:
        return "text"
    ext = os.path.splitext(args.output)[1].lower()
    return {".json": "json", ".txt": "text"}.get(ext, "html")


def _report(args: argparse.Namespace) -> int:
    from trainguard.explain.report.build import build_report
    from trainguard.render import installed_version, render
    from trainguard.render.run_words import verdict
    from trainguard.render.text import printable

    run = run_id(args)
    if args.checkpoint_dir and not os.path.isdir(args.checkpoint_dir):
        raise UsageError(f"{args.checkpoint_dir}: not a directory")
    for path in [p for pair in args.diff or [] for p in pair]:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    key = public_key(args.key)
    fmt = _format(args)
    ledger = open_ledger(args)
    try:
        report = build_report(
            ledger,
            run,
            public_key=key,
            checkpoint_dir=args.checkpoint_dir,
            diff_pairs=[(a, b) for a, b in args.diff or []],
            diffs=not args.no_diffs,
        )
    finally:
        ledger.close()
    write_output(render(report, fmt, tool_version=installed_version()), args.output)
    if args.output:
        print(f"{printable(args.output)}: {printable(verdict(report))}", file=sys.stderr)
    return report.exit_code()
