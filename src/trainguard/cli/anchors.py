"""The anchor file's pin, for every verb that stands on a run's ledger.

``ledger verify``, ``replay`` and ``verify-run`` all trust the run's records only as far
as its keys are pinned.  Without a pin the run key is taken from the ledger itself, so a
ledger rewritten whole under a fresh key verifies, and a replay or a verifier would then
recompute a history someone else wrote.  Each verb pins rank 0's key the same way: the
user's ``--expect-key-id`` first, else the anchor watch wrote at start
(:mod:`trainguard.ledger.anchorfile`), found in ``--anchors FILE`` or the default file;
``--no-anchors`` takes the key from the ledger, and says so.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.errors import UsageError

if TYPE_CHECKING:
    from trainguard.ledger.anchorfile import AnchorPin

_POSTGRES = ("postgresql://", "postgres://")


def add_anchors(p: argparse.ArgumentParser) -> None:
    """``--anchors FILE`` and ``--no-anchors`` (one or the other)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--anchors",
        metavar="FILE",
        help="the anchor file watch appended rank 0's run key id to at start (default "
        "$TRAINGUARD_ANCHORS, else $XDG_STATE_HOME/trainguard/anchors.jsonl; its rotated "
        "entries are read too): when it holds the run, rank 0's key is pinned from it",
    )
    group.add_argument(
        "--no-anchors",
        action="store_true",
        help="do not read the anchor file (the run key is then taken from the ledger itself)",
    )


def location_of(url: str) -> str:
    """The location a ledger's store names itself by (and watch anchored): a PostgreSQL
    URL without its password, a file as given (the anchor compares resolved paths)."""
    if url.startswith(_POSTGRES):
        from trainguard.ledger.postgres_store import redact_url

        return redact_url(url)
    return url


def anchor_pin(args: argparse.Namespace, run: str, location: str) -> AnchorPin:
    """What the anchor file (``--anchors`` or the default) says about ``run``."""
    from trainguard.ledger.anchorfile import AnchorPin, default_path, read_pin
    from trainguard.ledger.anchorrotate import archive_dir

    if getattr(args, "no_anchors", False):
        return AnchorPin(None, run, location)
    named = getattr(args, "anchors", None)
    if named and not Path(named).exists() and not archive_dir(Path(named)).is_dir():
        # Named on purpose: a typo must not quietly leave the run unanchored (a file
        # rotated away a moment ago still has its archive folder).
        raise UsageError(f"--anchors: {named} does not exist")
    return read_pin(Path(named) if named else default_path(), run, location)


@dataclass(frozen=True)
class Pins:
    """Rank 0's key ids to hold the run to, and what to say about them."""

    key_ids: list[str] | None  # None: taken from the ledger itself
    note: str  # one line for stderr: which pin, or why none
    warnings: tuple[str, ...] = ()  # the anchor file's medium findings (some lines no entry)
    refusal: str | None = None  # set: the run must not be recomputed (exit 1)


def pins_for(args: argparse.Namespace, run: str, url: str) -> Pins:
    """``--expect-key-id`` when given, else the anchor's pin, for ``replay`` and
    ``verify-run``.  Fails closed where ``ledger verify`` fails: an anchor file that
    cannot be used (TG1216 high) or an anchor of a run started unsigned whose stream 0
    now carries a key (TG1213) is a refusal, never a silently unpinned recomputation."""
    expected: list[str] | None = args.expect_key_id
    if expected is not None:
        return Pins(expected, "anchor: not read (--expect-key-id pins the run)")
    from trainguard.findings import Severity

    pin = anchor_pin(args, run, location_of(url))
    high = [f for f in pin.findings if f.severity >= Severity.HIGH]
    if high:
        return Pins(
            None,
            pin.note(),
            refusal=f"{high[0].rule}: {high[0].message} (pin the key with --expect-key-id, "
            "or --no-anchors to take it from the ledger)",
        )
    warnings = tuple(f"{f.rule}: {f.message}" for f in pin.findings)
    if pin.unsigned:
        key = _stream0_key(url, run)
        if key is not None:
            return Pins(
                None,
                pin.note(),
                warnings,
                refusal=f"TG1213: {pin.source()} records this run as started unsigned "
                f"(sign_key=False), but stream 0 now carries run key {key[:16]}: the stream "
                "was rewritten whole under a key of someone else's",
            )
    return Pins(pin.key_ids, pin.note(), warnings)


def _stream0_key(url: str, run: str) -> str | None:
    """The run key id stream 0's first record (its run-start) names, if any."""
    from trainguard.ledger import open_ledger

    ledger = open_ledger(url, create=False)
    try:
        first = next(iter(ledger.records(run, 0)), None)
    finally:
        ledger.close()
    if first is None or first.kind != "run-start":
        return None
    entry = first.payload.get("run_key")
    key_id = entry.get("key_id") if isinstance(entry, dict) else None
    return key_id if isinstance(key_id, str) else None
