"""``trainguard store watch``: guard a shared checkpoint folder."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from trainguard.cli._common import (
    EXIT_ERROR,
    EXIT_FINDINGS,
    EXIT_OK,
    Subparsers,
    add_verdict,
    fail_on,
    load_policy,
    plural,
)
from trainguard.errors import UsageError

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from trainguard.store.service import StoreGuard


def register(sub: Subparsers) -> None:
    store = sub.add_parser(
        "store",
        help="guard a shared checkpoint folder (scan, quarantine, record)",
        description="Services over a shared checkpoint store.",
    )
    verbs = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    w = verbs.add_parser(
        "watch",
        help="scan every new or changed file once its writer is done; quarantine failures",
        description="Watch DIR: each new or changed file is scanned once its writer is done "
        "(its stat unchanged for --settle seconds and no local process holding it open for "
        "writing); files at or above the failing severity are moved to QDIR (never deleted) "
        "with a .trainguard.json note of why. Every verdict is recorded (SQLite by default, "
        "PostgreSQL with --ledger postgresql://...), so a restart rescans nothing unchanged. "
        "Polling works on NFS/Lustre, where other hosts' writes raise no events. Exit codes "
        "with --once: 0 nothing quarantined, 1 something was, 2 error.",
    )
    w.add_argument("root", metavar="DIR", help="the store to guard")
    w.add_argument("--quarantine", metavar="QDIR", required=True, help="where failing files go")
    w.add_argument(
        "--ledger",
        metavar="URL",
        help="verdict store: a SQLite file or postgresql://... (default: QDIR/verdicts.sqlite)",
    )
    w.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    w.add_argument("--once", action="store_true", help="scan what is there now, then exit")
    w.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a file is ready once unchanged this long (default: 2)",
    )
    w.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="poll period (default: 1)"
    )
    w.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /status (JSON) and /healthz here",
    )
    w.add_argument(
        "--no-events",
        action="store_true",
        help="poll only (events from the watchdog library otherwise wake the guard early)",
    )
    add_verdict(w)
    w.set_defaults(handler=_watch)


def _watch(args: argparse.Namespace) -> int:
    from trainguard.store import StoreGuard, StoreOptions, open_verdicts

    if args.settle < 0 or args.interval <= 0:
        raise UsageError("--settle must be >= 0 and --interval > 0")
    options = StoreOptions(
        args.root,
        args.quarantine,
        fail_on=fail_on(args),
        policy=load_policy(args.policy),
        settle=args.settle,
        interval=args.interval,
    )
    where = args.ledger or os.path.join(args.quarantine, "verdicts.sqlite")
    os.makedirs(args.quarantine, exist_ok=True)
    guard = StoreGuard(options, open_verdicts(where))
    server = _serve(guard, args.http) if args.http else None
    try:
        if args.once:
            verdicts = guard.once()
            bad = [v for v in verdicts if v.outcome == "quarantined"]
            for v in bad:
                print(f"quarantined {v.path} -> {v.moved_to} ({v.severity or 'error'})")
            for problem in guard.errors:
                print(f"trainguard: error: {problem}", file=sys.stderr)
            print(
                f"{plural(len(verdicts), 'file')} decided, {len(bad)} quarantined",
                file=sys.stderr,
            )
            if bad:
                return EXIT_FINDINGS  # a finding outranks an error
            return EXIT_ERROR if guard.errors else EXIT_OK
        return _serve_forever(guard, args)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        guard.verdicts.close()


def _serve(guard: StoreGuard, address: str) -> ThreadingHTTPServer:
    from trainguard.store.metrics import serve

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--http {address!r}: expected HOST:PORT")
    server = serve(guard.metrics, host or "127.0.0.1", int(port))
    print(
        f"metrics on http://{host or '127.0.0.1'}:{server.server_address[1]}/metrics",
        file=sys.stderr,
    )
    return server


def _serve_forever(guard: StoreGuard, args: argparse.Namespace) -> int:
    from trainguard.store.events import start_events

    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()
        guard.wake.set()

    signal.signal(signal.SIGTERM, _stop)
    observer = None if args.no_events else start_events(args.root, guard.wake)
    mode = "events + polling" if observer is not None else "polling"
    print(f"guarding {args.root} ({mode}); quarantine: {args.quarantine}", file=sys.stderr)
    try:
        guard.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        if observer is not None:
            observer.stop()
    return EXIT_OK
