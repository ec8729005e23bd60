"""``trainguard scan``: static scan of model files; nothing read is unpickled, imported or run.

Start-up is a feature here: this module imports only the scanner's front
(``trainguard.scanner``) and the renderer; rich loads only for a progress bar
on a terminal, the hub code only for ``hf://`` paths.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from trainguard.findings import ScanReport, Severity
    from trainguard.scanner import Policy

# trainguard.scanner.hub.SCHEME, spelled here so that a local scan never imports the hub code.
_HUB_SCHEME = "hf://"


def register(sub: Subparsers) -> None:
    s = sub.add_parser(
        "scan",
        help="statically scan model files (never loads them)",
        description="Scan files and folders by content. Nothing read is "
        "unpickled, imported or evaluated. Exit 0 clean, 1 a finding at or above "
        "--fail-on, 2 error.",
    )
    s.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files or folders (recursive), or hf://ORG/REPO[@REVISION] (needs trainguard[hub])",
    )
    add_output(s, ("text", "json", "sarif"))
    s.add_argument(
        "--policy",
        metavar="FILE",
        help="TOML policy: extra allowed globals, severity changes (see docs/policy.md)",
    )
    add_verdict(s)
    no_progress_arg(s)
    s.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, scan only files matching GLOB (path relative to the folder, or "
        "file name; repeatable)",
    )
    s.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, skip files matching GLOB (repeatable; wins over --include)",
    )
    s.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="descend into folder symlinks (a link back up the tree is reported as a loop)",
    )
    s.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="scan in N worker processes (same report as one process)",
    )
    s.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="spread the scan over a Ray cluster (ADDRESS, or 'local' to start one here; "
        "needs trainguard[ray]); every node must see the files at the same paths",
    )
    s.add_argument(
        "--offline",
        action="store_true",
        help="hf:// paths: read only the local Hugging Face cache (as HF_HUB_OFFLINE=1)",
    )
    s.set_defaults(handler=_scan)


def _scan(args: argparse.Namespace) -> int:
    from trainguard.render import render
    from trainguard.scanner import scan

    policy = load_policy(args.policy)
    failing = fail_on(args)
    hub_paths = [path for path in args.paths if path.startswith(_HUB_SCHEME)]
    for path in args.paths:
        if path not in hub_paths and not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory")
    resolved = None
    paths = args.paths
    if hub_paths:
        from trainguard.scanner.hub import resolve_paths

        resolved = resolve_paths(args.paths, offline=args.offline)
        paths = resolved.paths
    options = _options(args, policy, failing)
    if show_progress(args):
        report = _scan_with_progress(paths, options)
    else:
        report = scan(paths, **options)
    if resolved is not None:
        resolved.relabel(report)
    write_output(render(report, args.format, color=use_color(args)), args.output)
    return report.exit_code()


def _options(args: argparse.Namespace, policy: Policy | None, failing: Severity) -> dict[str, Any]:
    from trainguard.scanner.walk import WalkOptions

    options: dict[str, Any] = {
        "policy": policy,
        "fail_on": failing,
        "walk_options": WalkOptions(args.include, args.exclude, args.follow_symlinks),
    }
    if args.jobs != 1 or args.ray is not None:
        from trainguard.limits import DEFAULT_LIMITS
        from trainguard.scanner import Policy
        from trainguard.scanner.parallel import runner_for

        options["runner"] = runner_for(
            jobs=args.jobs, ray=args.ray, policy=policy or Policy(), limits=DEFAULT_LIMITS
        )
    return options


def _scan_with_progress(paths: list[str], options: dict[str, Any]) -> ScanReport:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trainguard.scanner import scan

    with Progress(
        TextColumn("scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, path: str) -> None:
            bar.update(task, completed=done, total=total, description=os.path.basename(path))

        return scan(paths, progress=progress, **options)
