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
import sys
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from trainguard.cli._common import (
    EXIT_OK,
    LEDGER_ENV,
    Subparsers,
    add_ledger,
    add_output,
    add_run,
    add_verdict,
    fail_on,
    key_id_short,
    open_ledger,
    private_key,
    public_key,
    run_id,
    write_output,
)
from trainguard.cli.anchors import add_anchors, anchor_pin
from trainguard.cli.ledger_show import clip, printable, show, stream_name
from trainguard.errors import UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.findings import Finding
    from trainguard.ledger.verify import VerifyResult


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "ledger",
        help="show, verify and list the hash-chained records of training runs",
        description="The ledger that `trainguard.watch` writes: one hash chain per rank, "
        "signed heads. LEDGER is a SQLite file (or sqlite:///PATH) or a postgresql:// URL; "
        f"--ledger defaults to ${LEDGER_ENV}.",
    )
    verbs = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND", required=True)

    s = verbs.add_parser(
        "show",
        help="print a run's timeline and its alerts",
        description="Every record of RUN in time order (one line each: stream, seq, kind, "
        "step, payload fields), then its alerts. Shows, never verifies: use ledger verify.",
    )
    add_run(s)
    add_ledger(s)
    add_output(s, ("text", "json"))
    s.add_argument("--stream", type=int, metavar="N", help="only this stream (rank; -1: run)")
    s.add_argument("--kind", action="append", metavar="KIND", help="only these kinds")
    s.set_defaults(handler=show)

    v = verbs.add_parser(
        "verify",
        help="check a run's records for edits, deletions, reordering and truncation",
        description="Re-hash every record and check every link and signed head. Heads are "
        "checked with --key, or else with each stream's run key from its run-start record "
        "(taken from the ledger itself: pin it with --expect-key-id). A signed run must have "
        "ended: a run-end and a final signed head on every stream. Exit 0 intact, 1 a "
        "finding at or above --fail-on (default high: any break, a run that has not ended, "
        "or, with --key, no head signed by that key), 2 error.",
    )
    add_run(v)
    add_ledger(v)
    v.add_argument("--key", metavar="PUBLIC.pem", help="check head signatures with this key")
    v.add_argument(
        "--expect-key-id",
        action="append",
        metavar="ID",
        help="rank 0's run key id as watch logged it at start (16 to 64 hex characters): a "
        "run rewritten whole with another key fails; other ranks are vouched for by rank "
        "0's final run head (or repeat the option to pin them too)",
    )
    add_anchors(v)
    v.add_argument(
        "--live",
        action="store_true",
        help="the run is still running: a missing run-end is noted, not a failure",
    )
    add_output(v, ("text", "json", "sarif"))
    add_verdict(v)
    v.set_defaults(handler=_verify)

    r = verbs.add_parser(
        "runs",
        help="list the run ids in a ledger",
        description="One run id a line (--format json: a list).",
    )
    add_ledger(r)
    add_output(r, ("text", "json"))
    r.set_defaults(handler=_runs)

    g = verbs.add_parser(
        "sign",
        help="append a signed head to a stream of a run",
        description="Sign the current last record of a stream. A head of the run stream (-1, "
        "the default) also names the last record of every rank's stream.",
    )
    add_run(g)
    add_ledger(g)
    g.add_argument("--key", required=True, metavar="PRIVATE.pem", help="PEM private key")
    g.add_argument("--stream", type=int, default=-1, metavar="N", help="default -1 (the run)")
    g.set_defaults(handler=_sign)


# -- verify -------------------------------------------------------------------
def _keys_line(result: VerifyResult, keyed: bool, pinned: bool, anchored: str = "") -> str:
    if keyed:
        return f"{result.signed_heads} signed head(s) verified with the given key"
    if not result.run_keys:
        return "UNSIGNED: no run key, nothing authenticated (pin one with --expect-key-id)"
    ids = ", ".join(f"{stream_name(n)} {clip(k[:16])}" for n, k in sorted(result.run_keys.items()))
    how = (
        "pinned with --expect-key-id"
        if pinned
        else f"rank 0's pinned by {printable(anchored)}"
        if anchored
        else "keys taken from the ledger itself; pin them with --expect-key-id"
    )
    return f"{result.signed_heads} signed head(s) verified with the run keys ({ids}); {how}"


def _verify_text(
    run: str,
    location: str,
    result: VerifyResult,
    keyed: bool,
    failing: Severity,
    pinned: bool = False,
    anchored: str = "",
) -> str:
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
            f"  {Severity(f.severity)!s:<8} {f.rule} {title}: {clip(f.member)}{seq}: "
            f"{printable(f.message)}"
        )
    breaks = [f for f in result.findings if f.severity >= failing]
    if breaks:
        tally = Counter(str(Severity(f.severity)) for f in breaks)
        lines.append("FAIL: " + ", ".join(f"{n} {sev}" for sev, n in tally.items()))
    else:
        lines.append(f"OK: the chains are intact; {_keys_line(result, keyed, pinned, anchored)}")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    from trainguard.findings import FileResult, ScanReport
    from trainguard.ledger.runkey import check_expected_ids
    from trainguard.ledger.verify import verify_run
    from trainguard.render import installed_version, render
    from trainguard.render.jsonfmt import finding_dict

    run = run_id(args)
    failing = fail_on(args)
    key = public_key(args.key)
    expected = args.expect_key_id
    if expected is not None and check_expected_ids(expected):
        raise UsageError("--expect-key-id: " + "; ".join(check_expected_ids(expected)))
    ledger = open_ledger(args)
    try:
        location = str(getattr(ledger, "location", args.ledger))
        pin = anchor_pin(args, run, location)
        # The user's own pins win; the anchor file pins rank 0's key when none is given.
        pins = expected if expected is not None else pin.key_ids
        result = verify_run(ledger, run, key, live=args.live, expect_key_ids=pins)
    finally:
        ledger.close()
    anchored = pin.source() if expected is None and pin.key_ids is not None else ""
    findings = pin.apply(result.findings, result.run_keys) if expected is None else result.findings
    note = "anchor: not read (--expect-key-id pins the run)" if expected else pin.note()
    print(printable(note), file=sys.stderr)
    result = replace(result, findings=findings)
    report = ScanReport(
        files=[FileResult(location, "trainguard-ledger", result.records, result.findings)],
        fail_on=failing,
    )
    code = report.exit_code()
    if args.format == "sarif":
        text = render(report, "sarif")
    elif args.format == "json":
        document = {
            "tool": "trainguard",
            "version": installed_version(),
            "run_id": run,
            "ledger": location,
            "records": result.records,
            "streams": result.streams,
            "signatures_checked": key is not None or bool(result.run_keys),
            "signed_heads": result.signed_heads,
            # From the run-start records: authentic only as far as they are pinned.
            "run_keys": {str(n): k for n, k in sorted(result.run_keys.items())},
            "run_keys_pinned": expected is not None or bool(anchored),
            "anchor": anchored or None,
            "live": args.live,
            # Intact means no break (high and above), whatever --fail-on says fails.
            "intact": all(f.severity < Severity.HIGH for f in result.findings),
            "exit_code": code,
            "findings": [finding_dict(f, location) for f in result.findings],
        }
        text = json.dumps(document, indent=2, ensure_ascii=True)
    else:
        text = _verify_text(
            run, location, result, key is not None, failing, expected is not None, anchored
        )
    write_output(text, args.output)
    return code


# -- runs and sign ------------------------------------------------------------
def _runs(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    try:
        runs = ledger.runs()
    finally:
        ledger.close()
    if args.format == "json":
        write_output(json.dumps({"runs": runs}, indent=2, ensure_ascii=True), args.output)
    elif runs:
        write_output("\n".join(clip(r) for r in runs), args.output)
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    run = run_id(args)
    key = private_key(args.key)
    ledger = open_ledger(args)
    try:
        record = ledger.sign_head(run, args.stream, key)
    finally:
        ledger.close()
    print(
        f"signed run {clip(run)} {stream_name(args.stream)} up to seq {record.seq - 1} "
        f"(head at seq {record.seq}, key id {key_id_short(key.public_key())})",
        file=sys.stderr,
    )
    return EXIT_OK
