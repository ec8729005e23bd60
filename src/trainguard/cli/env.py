"""``trainguard env verify`` and ``env snapshot``: the command line of environment checks.

A thin layer over :mod:`trainguard.env.verify`: parse, call, render,
return the exit code (0 clean, 1 findings at or above the failing severity, 2
could not check).  The report goes to stdout or ``--output``; the progress bar
and the one-line summary go to stderr.  Keys are never printed, only key ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainguard.cli._common import (
    EXIT_OK,
    PASSWORD_ENV,
    Subparsers,
    add_output,
    add_verdict,
    fail_on,
    key_id_short,
    no_progress_arg,
    plural,
    private_key,
    public_key,
    show_progress,
    use_color,
    workers,
    write_output,
)
from trainguard.errors import UsageError
from trainguard.findings import FileResult

if TYPE_CHECKING:
    from trainguard.digest_cache import DigestCache
    from trainguard.env.digests import Progress
    from trainguard.env.snapshot import Snapshot
    from trainguard.env.verify import EnvOptions, EnvResult


def register(sub: Subparsers) -> None:
    env = sub.add_parser(
        "env",
        help="verify the installed Python environment",
        description="Check installed distributions against their RECORD hashes, and look "
        "for code that runs at start-up (.pth, sitecustomize) and compiled files that differ "
        "from their source. Nothing found is imported or executed.",
    )
    verbs = env.add_subparsers(dest="env_command", metavar="VERB", required=True)

    v = verbs.add_parser(
        "verify",
        help="check the environment (exit 1 on findings)",
        description="Verify every installed distribution's files against its RECORD, report "
        "files no RECORD lists, .pth files that run code, sitecustomize/usercustomize and "
        "swapped .pyc files; with --against, also every file against a signed snapshot.",
    )
    _targets(v)
    v.add_argument(
        "--against",
        metavar="SNAPSHOT",
        help="also compare every file with this "
        "signed snapshot (catches edits that rewrote RECORD too); needs --key",
    )
    v.add_argument("--key", metavar="PUBLIC.pem", help="public key that signed the snapshot")
    v.add_argument(
        "--wheelhouse",
        action="append",
        default=[],
        metavar="DIR",
        help="also compare every installed file with the wheel it came from, found in this "
        "folder of .whl files (searched recursively: pip's wheel cache works); catches "
        "edits that rewrote RECORD too (repeatable)",
    )
    v.add_argument(
        "--lock",
        metavar="FILE",
        help="requirements.txt with --hash=sha256: pins, or pylock.toml: every installed "
        "distribution must be locked at its version, and its wheel must have a locked hash",
    )
    add_output(v, ("text", "json", "sarif"))
    add_verdict(v)
    v.set_defaults(handler=_verify)

    s = verbs.add_parser(
        "snapshot",
        help="write a signed snapshot of every file's digest",
        description="Verify the environment, then sign a snapshot of every file's sha256, "
        "the interpreter and the platform (a DSSE envelope). Refuses an environment that "
        "fails verification unless --force.",
    )
    _targets(s)
    s.add_argument(
        "--key",
        required=True,
        metavar="PRIVATE.pem",
        help=f"PEM private key (an encrypted key reads its password from ${PASSWORD_ENV})",
    )
    s.add_argument(
        "-o", "--output", required=True, metavar="SNAPSHOT", help="where to write the snapshot"
    )
    s.add_argument("--force", action="store_true", help="write it even if there are findings")
    add_verdict(s)
    s.set_defaults(handler=_snapshot)


def _targets(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--path",
        action="extend",
        nargs="+",
        metavar="SITE_PACKAGES",
        help="site folders to check, first on sys.path first (default: this "
        "interpreter's site-packages and user site; sitecustomize is then looked "
        "for on its whole startup path)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="FILE",
        help="TOML allowlist of known-benign differences (repeatable; docs/env.md)",
    )
    p.add_argument(
        "--no-default-allow", action="store_true", help="do not apply the built-in allowlist"
    )
    p.add_argument(
        "--no-pyc", action="store_true", help="skip comparing compiled .pyc files with their source"
    )
    p.add_argument(
        "--stdlib",
        action="store_true",
        help="also check the standard library: its compiled files against their source "
        "(and, in a snapshot, every file's digest)",
    )
    p.add_argument(
        "--full", action="store_true", help="hash and compile everything afresh, ignoring the cache"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="hashing threads and compiling processes (default: from the cores)",
    )
    no_progress_arg(p)


class _Bar:
    """A rich progress bar on stderr: bytes while hashing, files while compiling."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._task: Any = None

    def start(self, phase: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(phase, total=total or None)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Progress | None]:
    if not show_progress(args):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn
    from rich.progress import Progress as RichProgress

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield _Bar(bar)


def _options(args: argparse.Namespace, against: Snapshot | None) -> EnvOptions:
    from trainguard.env.allow import DEFAULTS, load_allowlist
    from trainguard.env.verify import EnvOptions

    allow = [] if args.no_default_allow else list(DEFAULTS)
    for path in args.allow:
        allow.extend(load_allowlist(path))
    return EnvOptions(
        paths=args.path,
        check_pyc=not args.no_pyc,
        stdlib=args.stdlib,
        allowlist=allow,
        workers=workers(args),
        against=against,
        against_label=getattr(args, "against", None) or "",
        fail_on=fail_on(args),
    )


def _cache(args: argparse.Namespace, options: EnvOptions) -> DigestCache | None:
    from trainguard.digest_cache import DigestCache, default_cache_path
    from trainguard.env.verify import target_roots

    if args.no_cache:
        return None
    roots = target_roots(options.paths, options.against)
    return DigestCache(default_cache_path("env", roots), read=not args.full)


def _run(args: argparse.Namespace, options: EnvOptions) -> EnvResult:
    from trainguard.env.verify import verify_environment

    options.cache = _cache(args, options)
    with _progress(args) as bar:
        options.progress = bar
        return verify_environment(options)


def _summary(result: EnvResult) -> str:
    st = result.stats
    checked = (
        f"checked {plural(st.distributions, 'distribution')} and "
        f"{plural(st.files, 'file')} in {plural(len(st.roots), 'site folder')}: "
    )
    if st.reused_from is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.reused_from))
        return (
            f"{checked}nothing has changed since the verify of {when} (every file's inode, "
            f"size, mtime and ctime match), so its result stands; --full checks afresh; "
            f"in {st.seconds:.1f} s"
        )
    size = st.hashed_bytes
    amount = f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"
    return (
        f"{checked}"
        f"{plural(st.hashed_files, 'file')} hashed ({amount}), "
        f"{plural(st.pycs_checked, 'compiled file')} checked, "
        f"{plural(st.cache_hits, 'result')} from the cache, in {st.seconds:.1f} s"
    )


def _load_snapshot(args: argparse.Namespace) -> tuple[Snapshot | None, FileResult | None]:
    """The verified snapshot, or the result that says why it cannot be trusted."""
    if args.against is None:
        if args.key is not None:
            raise UsageError("--key is for --against SNAPSHOT")
        return None, None
    from trainguard.env.snapshot import read_snapshot
    from trainguard.signing.errors import VerificationError

    key = public_key(args.key)
    if key is None:
        raise UsageError("--against needs --key PUBLIC.pem (the key that signed the snapshot)")
    try:
        return read_snapshot(args.against, key), None
    except VerificationError as exc:
        findings = [f if f.file else f.located(args.against) for f in exc.findings]
        size = os.path.getsize(args.against) if os.path.isfile(args.against) else 0
        return None, FileResult(args.against, "environment snapshot", size, findings)


def _verify(args: argparse.Namespace) -> int:
    snapshot, bad_snapshot = _load_snapshot(args)
    options = _options(args, snapshot)
    if args.wheelhouse or args.lock:
        from trainguard.env.wheels import load_reference

        options.reference = load_reference(args.wheelhouse, args.lock)
    result = _run(args, options)
    report = result.report
    if bad_snapshot is not None:
        # Everything else was still checked; the snapshot itself is the finding.
        report.files.insert(0, bad_snapshot)
    from trainguard.render import render

    write_output(render(report, args.format, color=use_color(args)), args.output)
    print(_summary(result), file=sys.stderr)
    return report.exit_code()


def _snapshot(args: argparse.Namespace) -> int:
    from trainguard.env.snapshot import make_snapshot, write_snapshot
    from trainguard.render import render

    key = private_key(args.key)  # first: a bad key should not cost a full verify
    options = _options(args, None)
    options.collect_digests = True
    result = _run(args, options)
    code = result.report.exit_code()
    if code != EXIT_OK and not args.force:
        sys.stdout.write(render(result.report, "text"))
        print(
            "trainguard: the environment fails verification; no snapshot written (a "
            "snapshot would bless what is wrong; --force writes it anyway)",
            file=sys.stderr,
        )
        return code
    snapshot = make_snapshot(result.stats.roots, result.digests, result.stats.stdlib)
    write_snapshot(snapshot, key, args.output)
    print(_summary(result), file=sys.stderr)
    print(
        f"wrote {args.output}: {len(snapshot.files):,} files, python "
        f"{snapshot.interpreter['version']} at {snapshot.interpreter['executable']} (key id "
        f"{key_id_short(key.public_key())})",
        file=sys.stderr,
    )
    return EXIT_OK
