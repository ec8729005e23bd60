"""``trainguard ledger``: show, verify, list and sign the records of training runs.

A thin layer over :mod:`trainguard.ledger`.  Everything printed from a ledger
(run ids, kinds, payload values) was written by the monitored process, which
may be hostile, so it goes through :func:`printable` first.  A ledger is only
opened, never created, here.  Exit codes: 0 intact, 1 any break, 2 the ledger
could not be read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from trainguard.errors import UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.findings import Finding
    from trainguard.ledger import Ledger, Record
    from trainguard.ledger.verify import VerifyResult

EXIT_OK = 0
LEDGER_ENV = "TRAINGUARD_LEDGER"
# Payload fields shown first on a timeline line, when present.
PREFERRED_FIELDS = ("loss", "grad_norm", "step_time", "lr", "rule", "message")
MAX_FIELDS = 6
MAX_VALUE_CHARS = 60


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ledger",
        help="show, verify and list the hash-chained records of training runs",
        description="The ledger that `trainguard.watch` writes: one hash chain per rank, "
        "signed heads. LEDGER is a SQLite file (or sqlite:///PATH) or a postgresql:// URL; "
        f"--ledger defaults to ${LEDGER_ENV}.",
    )
    verbs = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND", required=True)

    s = verbs.add_parser("show", help="print a run's timeline and its alerts")
    s.add_argument("run", metavar="RUN", help="the run id")
    _ledger_arg(s)
    s.add_argument("-f", "--format", choices=("text", "json"), default="text")
    s.add_argument("--stream", type=int, metavar="N", help="only this stream (rank; -1: run)")
    s.add_argument("--kind", action="append", metavar="KIND", help="only these kinds")
    s.set_defaults(handler=_show)

    v = verbs.add_parser(
        "verify",
        help="check a run's records for edits, deletions, reordering and truncation",
        description="Re-hash every record and check every link and signed head. Exit 0 "
        "intact, 1 any break (or, with --key, no head signed by that key), 2 error.",
    )
    v.add_argument("run", metavar="RUN", help="the run id")
    _ledger_arg(v)
    v.add_argument("--key", metavar="PUBLIC.pem", help="check head signatures with this key")
    v.add_argument("-f", "--format", choices=("text", "json", "sarif"), default="text")
    v.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    v.set_defaults(handler=_verify)

    r = verbs.add_parser("runs", help="list the run ids in a ledger")
    _ledger_arg(r)
    r.add_argument("-f", "--format", choices=("text", "json"), default="text")
    r.set_defaults(handler=_runs)

    g = verbs.add_parser(
        "sign",
        help="append a signed head to a stream of a run",
        description="Sign the current last record of a stream. A head of the run stream (-1, "
        "the default) also names the last record of every rank's stream.",
    )
    g.add_argument("run", metavar="RUN", help="the run id")
    _ledger_arg(g)
    g.add_argument("--key", required=True, metavar="PRIVATE.pem", help="PEM private key")
    g.add_argument("--stream", type=int, default=-1, metavar="N", help="default -1 (the run)")
    g.set_defaults(handler=_sign)


def _ledger_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger",
        metavar="URL",
        default=os.environ.get(LEDGER_ENV),
        help=f"SQLite file or postgresql:// URL (default ${LEDGER_ENV})",
    )


def _open(args: argparse.Namespace) -> Ledger:
    from trainguard.ledger import open_ledger

    if not args.ledger:
        raise UsageError(f"no ledger given: use --ledger URL or set ${LEDGER_ENV}")
    return open_ledger(args.ledger, create=False)


def _write(text: str, output: str | None = None) -> None:
    text = text if text.endswith("\n") else text + "\n"
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def printable(text: str) -> str:
    # Imported on use: the renderer pulls in rich, which other verbs never need.
    from trainguard.render.text import printable as escape

    return escape(text)


def _clip(text: str) -> str:
    shown = printable(text)
    return shown if len(shown) <= MAX_VALUE_CHARS else shown[: MAX_VALUE_CHARS - 1] + "…"


# -- show ---------------------------------------------------------------------
def _value(value: Any) -> str | None:
    """A payload value short enough for a timeline line, or None to leave it out."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, str) and len(value) <= MAX_VALUE_CHARS:
        return _clip(value)
    return None  # containers and long strings (fingerprints) stay in --format json


def _details(payload: dict[str, Any]) -> str:
    names = [k for k in PREFERRED_FIELDS if k in payload]
    names += sorted(k for k in payload if k not in PREFERRED_FIELDS)
    parts: list[str] = []
    for name in names:
        shown = _value(payload[name])
        if shown is not None:
            parts.append(f"{_clip(name)}={shown}")
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
        text += f", key id {_clip(key[:16])}"
    return text


def _stream_name(stream: int) -> str:
    return "run" if stream == -1 else f"rank {stream}"


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
            f"{mark} {offset:>10}  {_stream_name(r.stream):<8} {r.seq:>6}  "
            f"{_clip(r.kind):<12} {step:>7}  {_describe(r)}".rstrip()
        )
    if alerts:
        lines += ["", f"alerts ({len(alerts)}):"]
        for r in alerts:
            step = "-" if r.step is None else str(r.step)
            lines.append(f"  ! step {step} {_stream_name(r.stream)}: {_details(r.payload)}")
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


def _show(args: argparse.Namespace) -> int:
    ledger = _open(args)
    try:
        records = [
            r
            for r in ledger.records(args.run, args.stream)
            if args.kind is None or r.kind in args.kind
        ]
        location = str(getattr(ledger, "location", args.ledger))
    finally:
        ledger.close()
    if not records and args.kind is None and args.stream is None:
        raise UsageError(f"no records for run {args.run!r} in {location}")
    # One clock per host; ties (same microsecond) keep the chain's order.
    records.sort(key=lambda r: (r.time, r.stream, r.seq))
    if args.format == "json":
        document = {
            "run_id": args.run,
            "ledger": location,
            "records": [_record_dict(r) for r in records],
            "alerts": [_record_dict(r) for r in records if r.kind == "alert"],
        }
        _write(json.dumps(document, indent=2, ensure_ascii=True))
    else:
        _write(_timeline(args.run, location, records))
    return EXIT_OK


# -- verify -------------------------------------------------------------------
def _verify_text(run: str, location: str, result: VerifyResult, keyed: bool) -> str:
    from trainguard.rules import RULES

    noun = "record" if result.records == 1 else "records"
    lines = [
        f"run {printable(run)} in {printable(location)}: {result.records} {noun}, "
        f"{result.streams} stream{'' if result.streams == 1 else 's'}"
    ]
    ordered: list[Finding] = sorted(result.findings, key=lambda f: -f.severity)
    for f in ordered:
        seq = "" if f.offset is None else f" seq {f.offset}"
        title = RULES[f.rule].title if f.rule in RULES else ""
        lines.append(
            f"  {Severity(f.severity)!s:<8} {f.rule} {title}: {_clip(f.member)}{seq}: "
            f"{printable(f.message)}"
        )
    breaks = [f for f in result.findings if f.severity >= Severity.HIGH]
    if breaks:
        tally = Counter(str(Severity(f.severity)) for f in breaks)
        lines.append("FAIL: " + ", ".join(f"{n} {sev}" for sev, n in tally.items()))
    else:
        how = (
            f"{result.signed_heads} signed head(s) verified"
            if keyed
            else "signatures not checked (no --key)"
        )
        lines.append(f"OK: the chains are intact; {how}")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    from trainguard.findings import FileResult, ScanReport
    from trainguard.ledger.verify import verify_run
    from trainguard.render import installed_version, render
    from trainguard.render.jsonfmt import finding_dict

    key = None
    if args.key:
        from trainguard.signing.keys import load_public_key

        key = load_public_key(args.key)
    ledger = _open(args)
    try:
        result = verify_run(ledger, args.run, key)
        location = str(getattr(ledger, "location", args.ledger))
    finally:
        ledger.close()
    report = ScanReport(
        files=[FileResult(location, "trainguard-ledger", result.records, result.findings)],
        fail_on=Severity.HIGH,
    )
    code = report.exit_code()
    if args.format == "sarif":
        text = render(report, "sarif")
    elif args.format == "json":
        document = {
            "tool": "trainguard",
            "version": installed_version(),
            "run_id": args.run,
            "ledger": location,
            "records": result.records,
            "streams": result.streams,
            "signatures_checked": key is not None,
            "signed_heads": result.signed_heads,
            "intact": code == EXIT_OK,
            "exit_code": code,
            "findings": [finding_dict(f, location) for f in result.findings],
        }
        text = json.dumps(document, indent=2, ensure_ascii=True)
    else:
        text = _verify_text(args.run, location, result, key is not None)
    _write(text, args.output)
    return code


# -- runs and sign ------------------------------------------------------------
def _runs(args: argparse.Namespace) -> int:
    ledger = _open(args)
    try:
        runs = ledger.runs()
    finally:
        ledger.close()
    if args.format == "json":
        _write(json.dumps({"runs": runs}, indent=2, ensure_ascii=True))
    elif runs:
        _write("\n".join(_clip(r) for r in runs))
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    from trainguard.cli.seal import _private_key
    from trainguard.signing.keys import key_id

    key = _private_key(args.key)
    ledger = _open(args)
    try:
        record = ledger.sign_head(args.run, args.stream, key)
    finally:
        ledger.close()
    print(
        f"signed run {_clip(args.run)} {_stream_name(args.stream)} up to seq {record.seq - 1} "
        f"(head at seq {record.seq}, key id {key_id(key.public_key())[:16]})",
        file=sys.stderr,
    )
    return EXIT_OK
