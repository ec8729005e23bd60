"""What every verb of the command line shares, written once.

Exit codes, the report output (``-f``/``-o``, colour, stdout or a file), the
verdict flags (``--fail-on``/``--strict``, the same meaning for every verb with
a verdict), key loading (a private key PEM with its password, a public key),
the ledger and the run arguments (the run is positional everywhere), sizes and
progress bars.  Only the standard library and trainguard's light modules are
imported at the top: ``trainguard scan`` imports this module too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainguard.errors import UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.ledger import Ledger
    from trainguard.scanner import Policy
    from trainguard.signing.keys import PrivateKey, PublicKey

# argparse's _SubParsersAction is private; its add_parser is all a verb module uses.
Subparsers = Any
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
PASSWORD_ENV = "TRAINGUARD_KEY_PASSWORD"  # noqa: S105 - the variable's name, not a secret
LEDGER_ENV = "TRAINGUARD_LEDGER"
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def warn(message: str) -> None:
    print(f"trainguard: warning: {message}", file=sys.stderr)


# -- output -------------------------------------------------------------------
def add_output(
    p: argparse.ArgumentParser, formats: tuple[str, ...], default: str | None = "text"
) -> None:
    """``-f/--format`` (one of ``formats``) and ``-o/--output FILE``."""
    p.add_argument("-f", "--format", choices=formats, default=default, help=f"default: {default}")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")


def use_color(args: argparse.Namespace) -> bool:
    """Colour only for text on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return (
        getattr(args, "output", None) is None
        and getattr(args, "format", "text") == "text"
        and sys.stdout.isatty()
        and "NO_COLOR" not in os.environ
    )


def write_output(text: str, output: str | None) -> None:
    """The report to ``output`` (a file) or stdout, ending with one newline."""
    text = text if text.endswith("\n") else text + "\n"
    if not output:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        # The name is the user's own argument, but it may hold control characters.
        raise UsageError(f"{output!r}: cannot write: {exc.strerror or exc}") from None


# -- verdict ------------------------------------------------------------------
def add_verdict(p: argparse.ArgumentParser, default: Severity = Severity.HIGH) -> None:
    """``--fail-on SEVERITY`` and ``--strict`` (= ``--fail-on medium``), for every verdict."""
    p.add_argument(
        "--fail-on",
        metavar="SEVERITY",
        type=Severity.parse,
        default=None,
        help=f"lowest severity that fails (critical, high, medium, low, info; default: {default})",
    )
    p.add_argument(
        "--strict", action="store_true", help="fail on medium findings too (--fail-on medium)"
    )


def fail_on(args: argparse.Namespace, default: Severity = Severity.HIGH) -> Severity:
    """The failing severity: ``--fail-on`` wins; ``--strict`` means medium."""
    chosen: Severity | None = getattr(args, "fail_on", None)
    if chosen is not None:
        if getattr(args, "strict", False) and chosen > Severity.MEDIUM:
            raise UsageError(f"--strict fails on medium, --fail-on {chosen} does not: pick one")
        return chosen
    return Severity.MEDIUM if getattr(args, "strict", False) else default


def loader_strict(args: argparse.Namespace) -> bool:
    """protect() and the safe loader refuse at one of two severities: high, or medium with
    ``strict``; so a loading verb takes ``--fail-on`` high or medium (or ``--strict``)."""
    failing = fail_on(args)
    if failing not in (Severity.HIGH, Severity.MEDIUM):
        raise UsageError(f"--fail-on {failing}: a load is refused at high or medium only")
    return failing == Severity.MEDIUM


def load_policy(path: str | None) -> Policy | None:
    """The TOML policy at ``path`` (``--policy``), or None for the default."""
    from trainguard.scanner import Policy

    return Policy.load(path) if path else None


# -- keys ---------------------------------------------------------------------
def private_key(path: str) -> PrivateKey:
    """A PEM private key; an encrypted one reads its password from $TRAINGUARD_KEY_PASSWORD,
    else asks on the terminal (never from argv, which other users can read)."""
    from trainguard.signing.errors import KeyLoadError
    from trainguard.signing.keys import load_private_key

    try:
        return load_private_key(path)
    except KeyLoadError as exc:
        if "password is needed" not in str(exc):
            raise
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise KeyLoadError(f"{path}: the key is encrypted; set ${PASSWORD_ENV}")
        import getpass  # only for an encrypted key on a terminal (start-up)

        password = getpass.getpass(f"password for {path}: ")
    return load_private_key(path, password.encode("utf-8"))


def public_key(path: str | None) -> PublicKey | None:
    """The PEM public key (or certificate) at ``path``; None when no path was given."""
    if path is None:
        return None
    from trainguard.signing.keys import load_public_key

    return load_public_key(path)


def key_id_short(key: PublicKey) -> str:
    from trainguard.signing.keys import key_id

    return key_id(key)[:16]


# -- ledger and run -----------------------------------------------------------
def add_ledger(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger",
        metavar="URL",
        default=os.environ.get(LEDGER_ENV),
        help=f"SQLite file or postgresql:// URL (default ${LEDGER_ENV})",
    )


def ledger_url(args: argparse.Namespace) -> str:
    if not args.ledger:
        raise UsageError(f"no ledger given: use --ledger URL or set ${LEDGER_ENV}")
    return str(args.ledger)


def open_ledger(args: argparse.Namespace) -> Ledger:
    """The ledger named by ``--ledger``, opened and never created."""
    from trainguard.ledger import open_ledger as open_

    return open_(ledger_url(args), create=False)


def add_run(p: argparse.ArgumentParser) -> None:
    """The run id, positional; ``--run RUN`` is kept (hidden) for old command lines."""
    p.add_argument("run", nargs="?", metavar="RUN", help="the run id")
    p.add_argument("--run", dest="run_option", metavar="RUN", help=argparse.SUPPRESS)


def run_id(args: argparse.Namespace) -> str:
    positional: str | None = args.run
    option: str | None = args.run_option
    if positional is not None and option is not None and positional != option:
        raise UsageError(f"two runs given: {positional!r} and --run {option!r}")
    if positional is None and option is None:
        raise UsageError("give the run id (RUN, the first argument)")
    if positional is None:
        warn("--run is deprecated: give the run id as the first argument")
    return positional if positional is not None else str(option)


# -- sizes and progress -------------------------------------------------------
def parse_size(text: str) -> int:
    """``1000000``, ``64M``, ``1GiB``: suffixes are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1000000, 512M, 1G)")
    suffix = (match.group(2) or " ").lower()[0]
    value: int = int(match.group(1)) * 1024 ** " kmgt".index(suffix)
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"  # pragma: no cover - the loop returns at GiB


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only on a terminal, and never with ``--no-progress``."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


@contextmanager
def byte_progress(enabled: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich bar on stderr counting bytes; ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def no_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def workers(args: argparse.Namespace) -> int | None:
    value: int | None = args.workers
    if value is not None and value < 1:
        raise UsageError("--workers must be at least 1")
    return value
