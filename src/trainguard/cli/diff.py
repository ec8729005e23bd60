"""CLI verbs of the explain pillar: ``diff``."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from trainguard.cli._common import (
    Subparsers,
    add_output,
    add_verdict,
    fail_on,
    load_policy,
    no_progress_arg,
    show_progress,
    use_color,
    write_output,
)
from trainguard.errors import UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.explain.diff.result import DiffReport
    from trainguard.scanner import Policy

# Progress is drawn only for checkpoints at least this large (tensor bytes).
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def register(sub: Subparsers) -> None:
    d = sub.add_parser(
        "diff",
        help="compare two checkpoints tensor by tensor and flag what training cannot do",
        description="Compare checkpoint A (older) with B (newer): every tensor and entry, "
        "exactly, plus forensic checks against the saved optimizer state. Both files are "
        "scanned first and never executed (a file with findings at or above --fail-on is "
        "refused). Exit 0 identical, 1 they differ or a finding at or above --fail-on "
        "(default high), 2 error.",
    )
    d.add_argument("a", metavar="A", help="the older checkpoint")
    d.add_argument("b", metavar="B", help="the newer checkpoint")
    add_output(d, ("text", "json", "html"))
    d.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    add_verdict(d)
    d.add_argument("--all", action="store_true", help="list unchanged tensors in text too")
    d.add_argument(
        "--sidecar",
        action="store_true",
        help="for safetensors, take names and values from trainguard convert's JSON sidecar "
        "(never read unless asked: a planted sidecar could rename tensors)",
    )
    no_progress_arg(d)
    d.set_defaults(handler=_diff)


def _diff(args: argparse.Namespace) -> int:
    from trainguard.explain.diff.core import diff
    from trainguard.render import installed_version, render

    for path in (args.a, args.b):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    policy = load_policy(args.policy)
    failing = fail_on(args)
    big = os.path.getsize(args.a) + os.path.getsize(args.b) >= 2 * PROGRESS_MIN_BYTES
    if big and show_progress(args):
        report = _with_progress(args, policy, failing)
    else:
        report = diff(
            args.a,
            args.b,
            policy=policy,
            strict=_strict(failing),
            fail_on=failing,
            sidecar=args.sidecar,
        )
    text = render(
        report,
        args.format,
        tool_version=installed_version(),
        color=use_color(args),
        show_all=args.all,
    )
    write_output(text, args.output)
    return report.exit_code()


def _strict(failing: Severity) -> bool:
    # The scanner refuses a file to diff at high, or at medium with strict: a lower
    # --fail-on refuses at medium and fails the verdict on the rest.
    return failing <= Severity.MEDIUM


def _with_progress(
    args: argparse.Namespace, policy: Policy | None, failing: Severity
) -> DiffReport:
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

        return diff(
            args.a,
            args.b,
            policy=policy,
            strict=_strict(failing),
            fail_on=failing,
            progress=progress,
            sidecar=args.sidecar,
        )
