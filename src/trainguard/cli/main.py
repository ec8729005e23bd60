"""The command line: a thin layer over the library.

Exit codes are the same for every verb: 0 clean or verified, 1 findings or
failed verification, 2 usage error or the tool could not do its job.  Data
goes to stdout (or ``--output``); progress and status go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from trainguard.errors import TrainguardError, UnsafeModelError, UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.findings import ScanReport
    from trainguard.scanner import Policy

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
# trainguard.scanner.hub.SCHEME, spelled here so that a local scan never imports the hub code.
_HUB_SCHEME = "hf://"
# Verbs defined in this module: a command line that names one builds only
# these, skipping the pillars' modules and parsers (a tenth of a scan's start-up).
_CORE_VERBS = ("scan", "rules", "demo")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse exits 2 on usage errors already; keep its message short.
        self.print_usage(sys.stderr)
        print(f"trainguard: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _parser(*, core_only: bool = False) -> argparse.ArgumentParser:
    from trainguard import __version__

    p = _Parser(
        prog="trainguard",
        description="Stop, detect and explain sabotage of ML "
        "training. Exit codes: 0 clean, 1 findings, 2 error.",
    )
    p.add_argument("--version", action="version", version=f"trainguard {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "scan",
        help="statically scan model files (never loads them)",
        description="Scan files and folders by content. Nothing read is "
        "unpickled, imported or evaluated.",
    )
    s.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files or folders (recursive), or hf://ORG/REPO[@REVISION] (needs trainguard[hub])",
    )
    s.add_argument("-f", "--format", choices=("text", "json", "sarif"), default="text")
    s.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    s.add_argument(
        "--policy",
        metavar="FILE",
        help="TOML policy: extra allowed globals, severity changes (see docs/policy.md)",
    )
    s.add_argument("--strict", action="store_true", help="fail on medium findings too")
    s.add_argument(
        "--fail-on",
        metavar="SEVERITY",
        type=Severity.parse,
        default=None,
        help="lowest severity that fails the scan (default: high)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.add_argument(
        "--offline",
        action="store_true",
        help="hf:// paths: read only the local Hugging Face cache (as HF_HUB_OFFLINE=1)",
    )

    r = sub.add_parser("rules", help="list the rule ids findings can carry")
    r.add_argument("--markdown", action="store_true", help="as docs/rules.md")

    d = sub.add_parser("demo", help="play the training-sabotage incident end to end")
    d.add_argument("--keep", metavar="DIR", help="work in DIR and keep everything (report.html...)")

    # Each pillar adds its own verbs: register(sub) adds parsers whose
    # set_defaults(handler=...) takes the parsed args and returns an exit code.
    if not core_only:
        for module in _PILLAR_CLIS:
            importlib.import_module(module).register(sub)
    return p


_PILLAR_CLIS: tuple[str, ...] = (
    "trainguard.cli.load",
    "trainguard.cli.seal",
    "trainguard.cli.env",
    "trainguard.cli.ledger",
    "trainguard.cli.diff",
    "trainguard.cli.replay",
    "trainguard.cli.report",
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    core_only = bool(argv) and argv[0] in _CORE_VERBS
    args = _parser(core_only=core_only).parse_args(argv)
    try:
        if args.command == "scan":
            return _scan(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "demo":
            from trainguard.demo import run_demo

            return run_demo(keep=args.keep)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as exc:
        print(f"trainguard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except UnsafeModelError as exc:
        print(f"trainguard: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except TrainguardError as exc:
        print(f"trainguard: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("trainguard: interrupted", file=sys.stderr)
        return EXIT_ERROR


def _scan(args: argparse.Namespace) -> int:
    from trainguard.render import render
    from trainguard.scanner import Policy, scan

    policy = Policy.load(args.policy) if args.policy else None
    fail_on = args.fail_on or (Severity.MEDIUM if args.strict else Severity.HIGH)
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
    show_progress = not args.no_progress and sys.stderr.isatty()
    if show_progress:
        report = _scan_with_progress(paths, policy, fail_on)
    else:
        report = scan(paths, policy=policy, fail_on=fail_on)
    if resolved is not None:
        resolved.relabel(report)
    color = (
        args.output is None
        and args.format == "text"
        and sys.stdout.isatty()
        and ("NO_COLOR" not in os.environ)
    )
    text = render(report, args.format, color=color)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return report.exit_code()


def _scan_with_progress(paths: list[str], policy: Policy | None, fail_on: Severity) -> ScanReport:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trainguard.scanner import scan

    console = Console(stderr=True)
    with Progress(
        TextColumn("scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, path: str) -> None:
            bar.update(task, completed=done, total=total, description=os.path.basename(path))

        return scan(paths, policy=policy, fail_on=fail_on, progress=progress)


def _rules(args: argparse.Namespace) -> int:
    from trainguard.rules import RULES, rules_markdown

    if args.markdown:
        sys.stdout.write(rules_markdown())
    else:
        for r in RULES.values():
            print(f"{r.id}  {r.severity!s:8}  {r.title}")
    return EXIT_OK
