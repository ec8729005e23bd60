"""``trainguard replay``: re-run a watched run's steps and compare them with its ledger."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from trainguard.cli._common import (
    EXIT_FINDINGS,
    Subparsers,
    add_ledger,
    add_output,
    add_run,
    ledger_url,
    run_id,
    write_output,
)
from trainguard.cli.anchors import add_anchors, pins_for
from trainguard.cli.ledger_show import printable
from trainguard.errors import UsageError

MAX_KEY_FILE_BYTES = 4096
_HEX = re.compile(r"[0-9a-fA-F]+")


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "replay",
        help="re-run a watched run's steps and compare them with its ledger bit for bit",
        description="Restore the run's checkpoints, re-run its steps with your own training "
        "code (--entry, see docs/replay.md), recompute every step's fingerprints and compare "
        "them with the ledger. Reports the first step that diverges and which tensors. "
        "POSITIONS count steps done: checkpoint N holds the state before step N. Exit 0 "
        "matched, 1 diverged or the ledger does not verify (checked first, as `trainguard "
        "ledger verify`), 2 error or not comparable (threads, versions, device differ).",
    )
    add_run(p)
    add_ledger(p)
    p.add_argument(
        "--entry",
        required=True,
        metavar="MODULE:FUNCTION",
        help="your function building model, optimizer, batches and step (or file.py:function)",
    )
    p.add_argument("--from", dest="start", metavar="STEP|CKPT", help="start position")
    p.add_argument("--to", dest="stop", metavar="STEP|CKPT", help="stop before this step")
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="the run's fingerprint key (32 raw bytes or hex); without it the plain "
        "(unkeyed) fingerprints are compared",
    )
    p.add_argument("--rank", type=int, default=0, help="which rank's stream (default 0)")
    p.add_argument(
        "--all-ranks",
        action="store_true",
        help="a data-parallel run: replay every rank at once, in a gloo group of the recorded "
        "world size on this machine (the entry must be module:function)",
    )
    seg = p.add_mutually_exclusive_group()
    seg.add_argument(
        "--bisect",
        dest="segmented",
        action="store_true",
        default=None,
        help="replay segment by segment, each from its own checkpoint, to find the first bad "
        "segment (the default when the range holds several checkpoints)",
    )
    seg.add_argument(
        "--straight",
        dest="segmented",
        action="store_false",
        help="replay straight through from the first checkpoint",
    )
    p.add_argument(
        "--all", action="store_true", help="go on after a bad segment: report every segment"
    )
    p.add_argument(
        "--checkpoints", metavar="DIR", help="look for checkpoint files here (by their name)"
    )
    p.add_argument(
        "--expect-data",
        metavar="DIGEST",
        help="the sealed dataset's digest the run must have read (printed by `trainguard data "
        "seal`): other data, or an older version signed by the same key, is TG1522",
    )
    p.add_argument(
        "--key",
        dest="ledger_key",
        metavar="PUBLIC.pem",
        help="check the ledger's head signatures with this key (as `ledger verify --key`); "
        "by default each stream's run key from its run-start record",
    )
    p.add_argument(
        "--expect-key-id",
        action="append",
        metavar="ID",
        help="pin rank 0's run key id as watch logged it (as `ledger verify --expect-key-id`): "
        "a ledger rewritten whole with another key does not verify; without it rank 0's key "
        "is pinned from the anchor file, as `ledger verify` does",
    )
    add_anchors(p)
    p.add_argument(
        "--live",
        action="store_true",
        help="the run is still running: its missing end is noted, not a failure (a ledger cut "
        "back to an earlier signed head then looks the same; the report says which steps no "
        "signature covers)",
    )
    add_output(p, ("text", "json"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=_replay)


def read_key(path: str) -> bytes:
    """The key in ``path``: 32 or more raw bytes, or the same written in hex."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--key-file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"--key-file {path}: larger than a key ({MAX_KEY_FILE_BYTES} bytes)")
    text = data.strip()
    if text and _HEX.fullmatch(text.decode("ascii", "replace")) and len(text) % 2 == 0:
        data = bytes.fromhex(text.decode("ascii"))
    if len(data) < 16:
        raise UsageError(f"--key-file {path}: {len(data)} bytes is too short for a run key")
    return data


def expect_digest(text: str | None) -> str | None:
    """A pinned dataset digest: 64 hex digits (case folded), or a usage error."""
    if text is None:
        return None
    digest = text.strip().lower().removeprefix("sha256:")
    if not _HEX.fullmatch(digest) or len(digest) != 64:
        raise UsageError(f"--expect-data {text[:80]!r}: not a SHA-256 digest (64 hex digits)")
    return digest


def _replay(args: argparse.Namespace) -> int:
    from trainguard.explain.replay.engine import replay
    from trainguard.ledger.runkey import check_expected_ids
    from trainguard.render import installed_version, render

    ledger = ledger_url(args)
    run = run_id(args)
    key = read_key(args.key_file) if args.key_file else None
    expected = args.expect_key_id
    if expected is not None and check_expected_ids(expected):
        raise UsageError("--expect-key-id: " + "; ".join(check_expected_ids(expected)))

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"trainguard replay: {text}", file=sys.stderr, flush=True)

    pins = pins_for(args, run, ledger)
    for line in (pins.note, *pins.warnings):  # also with -q: what the replay stands on
        print(f"trainguard replay: {printable(line)}", file=sys.stderr)
    if pins.refusal is not None:  # as `ledger verify` would fail it: nothing is replayed
        print(f"trainguard replay: {printable(pins.refusal)}; not replayed", file=sys.stderr)
        return EXIT_FINDINGS

    options = {
        "start": args.start,
        "stop": args.stop,
        "key": key,
        "segmented": args.segmented,
        "all_segments": args.all,
        "checkpoint_dir": args.checkpoints,
        "expect_data": expect_digest(args.expect_data),
        # A path, not a key object: the options also travel to --all-ranks' processes.
        "public_key": args.ledger_key,
        "expect_key_ids": pins.key_ids,
        "live": args.live,
    }
    if args.all_ranks:
        return _all_ranks(args, ledger, run, options)
    report = replay(ledger, run, args.entry, rank=args.rank, progress=progress, **options)
    write_output(render(report, args.format, tool_version=installed_version()), args.output)
    return report.exit_code()


def _all_ranks(args: argparse.Namespace, ledger: str, run: str, options: dict[str, Any]) -> int:
    """Every rank's report, one after the other, and where the divergence began."""
    import json

    from trainguard.explain.replay.ranks import replay_ranks, sources, world_size
    from trainguard.render import installed_version, render
    from trainguard.render.replay import report_dict

    reports = replay_ranks(ledger, run, args.entry, world_size(ledger, run), **options)
    step, ranks = sources(reports)
    version = installed_version()
    if args.format == "json":
        data = {
            "ranks": [report_dict(r, tool_version=version) for r in reports],
            "first_divergence": None if step is None else {"step": step, "ranks": ranks},
        }
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = "\n".join(render(r, "text", tool_version=version) for r in reports)
        if step is not None:
            text += f"\nthe divergence began on rank {', '.join(map(str, ranks))} at {step}\n"
    write_output(text, args.output)
    return max(r.exit_code() for r in reports)
