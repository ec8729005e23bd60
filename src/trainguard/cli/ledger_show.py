"""``trainguard ledger show``: a run's timeline and its alerts, as text or JSON.

Everything printed from a ledger (run ids, kinds, payload values) was written
by the monitored process, which may be hostile, so it goes through
:func:`printable` first.  Shows, never verifies (``ledger verify`` does).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING, Any

from trainguard.cli._common import EXIT_OK, open_ledger, run_id, write_output
from trainguard.errors import UsageError

if TYPE_CHECKING:
    from trainguard.ledger import Record

# Payload fields shown first on a timeline line, when present.
PREFERRED_FIELDS = ("loss", "grad_norm", "step_time", "lr", "rule", "message")
MAX_FIELDS = 6
MAX_VALUE_CHARS = 60
WHOLE_FIELDS = ("message",)  # shown in full whatever their length


def printable(text: str) -> str:
    # Imported on use: the renderer pulls in rich, which other verbs never need.
    from trainguard.render.text import printable as escape

    return escape(text)


def clip(text: str) -> str:
    shown = printable(text)
    return shown if len(shown) <= MAX_VALUE_CHARS else shown[: MAX_VALUE_CHARS - 1] + "…"


def stream_name(stream: int) -> str:
    return "run" if stream == -1 else f"rank {stream}"


def _value(value: Any) -> str | None:
    """A payload value short enough for a timeline line, or None to leave it out."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, str) and len(value) <= MAX_VALUE_CHARS:
        return clip(value)
    return None  # containers and long strings (fingerprints) stay in --format json


def _details(payload: dict[str, Any]) -> str:
    names = [k for k in PREFERRED_FIELDS if k in payload]
    names += sorted(k for k in payload if k not in PREFERRED_FIELDS)
    parts: list[str] = []
    for name in names:
        value = payload[name]
        # An alert's message is what a reader needs whole (escaped, never clipped).
        whole = name in WHOLE_FIELDS and isinstance(value, str)
        shown = printable(value) if whole else _value(value)
        if shown is not None:
            parts.append(f"{clip(name)}={shown}")
        if len(parts) == MAX_FIELDS:
            break
    return " ".join(parts)


def _describe(record: Record) -> str:
    if record.kind != "head":
        return _details(record.payload)
    from trainguard.ledger.heads import parse_statement, unverified_payload

    try:
        statement = parse_statement(unverified_payload(record.payload.get("envelope")))
    except ValueError as exc:
        return f"unreadable signed head: {printable(str(exc))}"
    key = record.payload.get("key_id")
    # Unverified: `ledger verify --key` checks signatures; show only describes.
    text = f"signs seq {statement.head.seq}"
    if statement.others:
        text += f" and the heads of {len(statement.others)} rank stream(s)"
    if isinstance(key, str):
        text += f", key id {clip(key[:16])}"
    return text


def _timeline(run: str, location: str, records: list[Record]) -> str:
    alerts = [r for r in records if r.kind == "alert"]
    steps = [r.step for r in records if r.step is not None]
    span = f", steps {min(steps)}..{max(steps)}" if steps else ""
    streams = len({r.stream for r in records})
    lines = [
        f"run {printable(run)} in {printable(location)}: {len(records)} records in {streams} "
        f"stream{'' if streams == 1 else 's'}{span}, {len(alerts)} alert"
        f"{'' if len(alerts) == 1 else 's'}",
        "",
        f"  {'time':>10}  {'stream':<8} {'seq':>6}  {'kind':<12} {'step':>7}  details",
    ]
    start = records[0].time if records else 0.0
    for r in records:
        mark = "!" if r.kind == "alert" else " "
        offset = f"+{r.time - start:.3f}s" if math.isfinite(r.time - start) else "?"
        step = "-" if r.step is None else str(r.step)
        lines.append(
            f"{mark} {offset:>10}  {stream_name(r.stream):<8} {r.seq:>6}  "
            f"{clip(r.kind):<12} {step:>7}  {_describe(r)}".rstrip()
        )
    if alerts:
        lines += ["", f"alerts ({len(alerts)}):"]
        for r in alerts:
            step = "-" if r.step is None else str(r.step)
            lines.append(f"  ! step {step} {stream_name(r.stream)}: {_details(r.payload)}")
    return "\n".join(lines)


def _record_dict(r: Record) -> dict[str, Any]:
    return {
        "stream": r.stream,
        "seq": r.seq,
        "kind": r.kind,
        "step": r.step,
        "time": r.time,
        "payload": r.payload,
        "digest": r.digest,
    }


def show(args: argparse.Namespace) -> int:
    run = run_id(args)
    ledger = open_ledger(args)
    try:
        records = [
            r for r in ledger.records(run, args.stream) if args.kind is None or r.kind in args.kind
        ]
        location = str(getattr(ledger, "location", args.ledger))
    finally:
        ledger.close()
    if not records and args.kind is None and args.stream is None:
        raise UsageError(f"no records for run {run!r} in {location}")
    # One clock per host; ties (same microsecond) keep the chain's order.
    records.sort(key=lambda r: (r.time, r.stream, r.seq))
    if args.format == "json":
        document = {
            "run_id": run,
            "ledger": location,
            "records": [_record_dict(r) for r in records],
            "alerts": [_record_dict(r) for r in records if r.kind == "alert"],
        }
        text = json.dumps(document, indent=2, ensure_ascii=True)
    else:
        text = _timeline(run, location, records)
    write_output(text, args.output)
    return EXIT_OK
