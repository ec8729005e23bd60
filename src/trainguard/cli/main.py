"""The command line: a thin layer over the library.

Exit codes are the same for every verb: 0 clean or verified, 1 findings or
failed verification, 2 usage error or the tool could not do its job (an
unexpected exception included: a crash never reads as findings), 130
interrupted.  Data goes to stdout (or ``--output``); progress and status go
to stderr.

Each verb lives in its own module, registered in :data:`VERBS`; a command line
that names a verb imports and builds only that verb's module and parser (the
other verbs' modules are a tenth of a scan's start-up).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from trainguard.cli._common import EXIT_ERROR, EXIT_FINDINGS, EXIT_INTERRUPTED
from trainguard.errors import TrainguardError, UnsafeModelError, UsageError

DEBUG_ENV = "TRAINGUARD_DEBUG"

# Verb -> the module whose register(sub) adds it (one module may add several verbs).
# The order is the order of `trainguard --help`.
VERBS: dict[str, str] = {
    "scan": "trainguard.cli.scan",
    "rules": "trainguard.cli.rules",
    "demo": "trainguard.cli.demo",
    "run": "trainguard.cli.run",
    "convert": "trainguard.cli.convert",
    "seal": "trainguard.cli.seal",
    "verify": "trainguard.cli.seal",
    "keygen": "trainguard.cli.seal",
    "data": "trainguard.cli.data",
    "env": "trainguard.cli.env",
    "ledger": "trainguard.cli.ledger",
    "diff": "trainguard.cli.diff",
    "replay": "trainguard.cli.replay",
    "verify-run": "trainguard.cli.verify_run",
    "report": "trainguard.cli.report",
    "store": "trainguard.cli.store",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse exits 2 on usage errors already; keep its message short.
        self.print_usage(sys.stderr)
        print(f"trainguard: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; with a known ``verb``, only that verb's module is imported."""
    from trainguard import __version__

    p = _Parser(
        prog="trainguard",
        description="Stop, detect and explain sabotage of ML "
        "training. Exit codes: 0 clean, 1 findings, 2 error.",
    )
    p.add_argument("--version", action="version", version=f"trainguard {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an internal error (also ${DEBUG_ENV}=1)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [VERBS[verb]] if verb in VERBS else list(dict.fromkeys(VERBS.values()))
    for module in modules:
        importlib.import_module(module).register(sub)
    _debug_everywhere(p)
    return p


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the verb too (``trainguard scan --debug x``), as people type it.

    SUPPRESS as the default: a verb's parser must not reset the top-level value.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--debug" in a.option_strings for a in sub._actions):
                    sub.add_argument(
                        "--debug",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help="print the traceback of an internal error",
                    )
                _debug_everywhere(sub)


def _verb(argv: Sequence[str]) -> str | None:
    # The top-level options (--debug, --version, -h) take no value, so the
    # first word that is not an option is the verb.
    return next((a for a in argv if not a.startswith("-")), None)


def _printable(text: str, *, lines: bool = True) -> str:
    """Error messages quote paths and names from files: no control characters reach the
    terminal (the line breaks of a multi-line message stay, with ``lines``)."""
    keep = "\n" if lines else ""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace()
    try:
        args = build_parser(_verb(argv)).parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except KeyboardInterrupt:
        print("trainguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"trainguard: error: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except UnsafeModelError as exc:
        # A refused file is what the user asked us to find: findings, exit 1.
        print(f"trainguard: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_FINDINGS
    except TrainguardError as exc:
        print(f"trainguard: {_printable(str(exc))}", file=sys.stderr)
        code = getattr(exc, "exit_code", EXIT_ERROR)
        return code if isinstance(code, int) else EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`trainguard ... | head`): the report was not delivered.
        _silence_stdout()
        return EXIT_ERROR
    except Exception as exc:  # the one catch-all: a crash must not read as 0 or 1
        debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        return _unexpected(exc, debug)


def _unexpected(exc: Exception, debug: bool) -> int:
    """One line on stderr, exit 2; the traceback only when asked for."""
    if debug:
        import traceback  # only here: a clean run never needs it (start-up)

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, OSError) and exc.strerror:
        # The system refused something (a file, the disk): the user's to fix, not our bug.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        message = _printable(f"{where}{exc.strerror}", lines=False)
        print(f"trainguard: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {_printable(lines[0])}" if lines else type(exc).__name__
    hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
    print(f"trainguard: internal error: {detail}{hint}", file=sys.stderr)
    return EXIT_ERROR


def _silence_stdout() -> None:
    """Point the real stdout at /dev/null, so that flushing it at exit cannot fail again."""
    if sys.stdout is not sys.__stdout__ or sys.stdout is None:
        return  # replaced (a test's capture): not ours to redirect
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
