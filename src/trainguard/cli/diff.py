"""CLI verbs of the explain pillar: ``diff``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainguard.explain.diff.result import DiffReport

# Progress is drawn only for checkpoints at least this large (tensor bytes).
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def register(sub: Any) -> None:
    d = sub.add_parser(
        "diff",
        help="compare two checkpoints tensor by tensor and flag what training cannot do",
        description="Compare checkpoint A (older) with B (newer): every tensor and entry, "
        "exactly, plus forensic checks against the saved optimizer state. Both files are "
        "scanned first and never executed. Exit 0 identical, 1 they differ or a finding at "
        "high or above, 2 error.",
    )
    d.add_argument("a", metavar="A")
    d.add_argument("b", metavar="B")
    d.add_argument("-f", "--format", choices=("text", "json", "html"), default="text")
    d.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    d.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    d.add_argument("--strict", action="store_true", help="refuse files with medium findings")
    d.add_argument("--all", action="store_true", help="list unchanged tensors in text too")
    d.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    d.set_defaults(handler=_diff)


def _diff(args: argparse.Namespace) -> int:
    from trainguard.errors import UsageError
    from trainguard.explain.diff.core import diff
    from trainguard.render import installed_version
    from trainguard.render.diff import render
    from trainguard.scanner import Policy

    for path in (args.a, args.b):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    policy = Policy.load(args.policy) if args.policy else None
    big = os.path.getsize(args.a) + os.path.getsize(args.b) >= 2 * PROGRESS_MIN_BYTES
    if big and not args.no_progress and sys.stderr.isatty():
        report = _with_progress(args, policy)
    else:
        report = diff(args.a, args.b, policy=policy, strict=args.strict)
    color = args.output is None and args.format == "text" and sys.stdout.isatty()
    color = color and "NO_COLOR" not in os.environ
    text = render(
        report, args.format, tool_version=installed_version(), color=color, show_all=args.all
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return report.exit_code()


def _with_progress(args: argparse.Namespace, policy: Any) -> DiffReport:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from trainguard.explain.diff.core import diff

    with Progress(
        TextColumn("diff"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[-40:])

        return diff(args.a, args.b, policy=policy, strict=args.strict, progress=progress)
