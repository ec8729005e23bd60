"""Verification: every record re-hashed, every link and signed head checked.

One pass over the run's records in (stream, seq) order; the run stream (-1)
comes first, so the claims its signed run heads make about the other streams
are known before those streams are read.  Each problem is a finding with a
TG12xx rule; nothing is ever "probably fine".  One edit gives one finding,
not one per later record: after a break the chain is followed from the
stored digest of the damaged record.  Past :data:`MAX_FINDINGS_PER_RULE`
findings of one rule (over all streams: their number is the ledger's to choose),
the rest are counted in a last finding.

Heads are checked with the key given, or else with each stream's run key
from its run-start record (ledger/runkey.py; the run stream's with rank 0's).
A signed run must also show its end (ledger/ends.py): a run-end and a final
signed head on every stream, and a run head naming them all, so a stream cut
back to an earlier signed head fails too.  What the ledger alone cannot show
is a run rewritten whole with a new key: pin the key (``expect_key_ids``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainguard.findings import Finding, Severity
from trainguard.ledger.chain import (
    GENESIS,
    HEAD_KIND,
    HEAD_PAYLOAD_TYPE,
    RUN_STREAM,
    LedgerError,
    Record,
    canonical_json,
    is_hex_digest,
    record_digest,
)
from trainguard.ledger.ends import EndState, check_ends
from trainguard.ledger.heads import Statement, parse_statement, unverified_payload
from trainguard.ledger.runkey import RUN_KEY_FIELD, first_record, key_from_entry, key_id_of
from trainguard.rules import rule

if TYPE_CHECKING:
    from trainguard.ledger.interface import Ledger

MAX_FINDINGS_PER_RULE = 20
# A record whose digest fails is re-hashed under nearby seqs to tell a moved
# record from an edited one; bounded so a wrecked ledger costs little extra.
REORDER_WINDOW = 16
MAX_REORDER_PROBES = 20_000
_UNREADABLE_KEY = "trainguard:unreadable"  # store.UNREADABLE_KEY, without importing a backend


@dataclass
class _Claim:
    seq: int
    digest: str
    by: str
    signed: bool


@dataclass
class _Stream:
    number: int
    next_seq: int = 0
    prev: str = GENESIS  # stored digest of the last record read
    last_seq: int = -1
    cover: int = -1  # last seq vouched for by a verified signature
    claims: list[_Claim] = field(default_factory=list)
    claim_index: int = 0
    # Digests of records found at the wrong seq: the record after one of them
    # links to it, which the reorder finding already explains.
    moved: set[str] = field(default_factory=set)
    key: Any = None  # what its heads are checked with (None: consistency only)
    key_id: str = ""
    end: EndState = field(default_factory=EndState)


def _record_digest(record: Record, seq: int) -> str:
    text = canonical_json(record.payload)
    return record_digest(
        record.run_id,
        record.stream,
        seq,
        record.kind,
        record.step,
        record.time,
        text,
        record.prev,
    )


class _Verifier:
    def __init__(
        self, run_id: str, public_key: Any, location: str, first: Record | None = None
    ) -> None:
        self.run_id = run_id
        self.key = public_key
        self.location = location
        # Stream 0's first record, read ahead: rank 0's run key checks the run stream,
        # which is read before stream 0.
        self.first = first
        self.findings: list[Finding] = []
        self.records = 0
        self.signatures = 0
        self.streams: dict[int, _Stream] = {}
        self.current: _Stream | None = None
        self.pending: dict[int, list[_Claim]] = {}
        self.probes = 0
        self.emitted: Counter[str] = Counter()  # per rule, over all streams
        self.capped_streams: dict[str, set[int]] = {}
        # The highest severity among the findings left out: an info note at a lower
        # severity than its rule's (--live) must not count as a break when summarised.
        self.capped_severity: dict[str, Severity] = {}

    # -- findings -------------------------------------------------------------
    def emit(
        self,
        rule_id: str,
        stream: int,
        seq: int | None,
        message: str,
        severity: Severity | None = None,
        **evidence: object,
    ) -> None:
        count = self.emitted[rule_id]
        self.emitted[rule_id] += 1
        info = rule(rule_id)
        level = info.severity if severity is None else severity
        if count >= MAX_FINDINGS_PER_RULE:
            self.capped_severity[rule_id] = max(self.capped_severity.get(rule_id, level), level)
            where = self.capped_streams.setdefault(rule_id, set())
            if len(where) < MAX_FINDINGS_PER_RULE:
                where.add(stream)
            return
        self.findings.append(
            Finding(
                rule=rule_id,
                severity=level,
                message=message,
                file=self.location,
                member=f"run {self.run_id} stream {stream}",
                offset=seq,
                evidence={k: str(v) for k, v in evidence.items()},
            )
        )

    def summarise_capped(self) -> None:
        for rule_id, count in sorted(self.emitted.items()):
            if count > MAX_FINDINGS_PER_RULE:
                more = count - MAX_FINDINGS_PER_RULE
                where = sorted(self.capped_streams.get(rule_id, ()))
                streams = ", ".join(map(str, where[:5])) + (", ..." if len(where) > 5 else "")
                self.findings.append(
                    Finding(
                        rule=rule_id,
                        severity=self.capped_severity[rule_id],
                        message=f"{more} more {rule(rule_id).title} findings are not listed "
                        f"(in streams {streams})",
                        file=self.location,
                        member=f"run {self.run_id}",
                        evidence={"not_listed": str(more)},
                    )
                )

    # -- records --------------------------------------------------------------
    def feed(self, record: Record) -> None:
        self.records += 1
        st = self.current
        if st is not None and (
            record.stream < st.number or (record.stream == st.number and record.seq <= st.last_seq)
        ):
            # Only a key column edited to something that is not an integer sorts
            # like this; the record cannot be placed in any chain.
            self.emit(
                "TG1201",
                st.number,
                record.seq,
                f"a record ({record.kind}) is out of (stream, seq) order: its key columns "
                f"were edited ({record.payload.get(_UNREADABLE_KEY, 'stream or seq')})",
                stored_digest=record.digest,
            )
            return
        if st is None or record.stream != st.number:
            st = self.open_stream(record.stream)
        explained = False
        if record.seq > st.next_seq:
            first, last = st.next_seq, record.seq - 1
            what = f"seq {first}" if first == last else f"seqs {first}..{last}"
            self.emit(
                "TG1202",
                st.number,
                first,
                f"{last - first + 1} record(s) missing before seq {record.seq} ({what}): "
                "deleted from the chain",
                first_missing=first,
                last_missing=last,
            )
            explained = True
        if record.prev in st.moved:
            explained = True
        if not self.content_intact(record):
            if self.report_content(record):
                explained = True
                if len(st.moved) < MAX_FINDINGS_PER_RULE * 10:
                    st.moved.add(record.digest)
        if record.prev != st.prev and not explained:
            self.emit(
                "TG1203",
                st.number,
                record.seq,
                f"record seq {record.seq} ({record.kind}) does not follow the record before "
                "it: a record was replaced, inserted or rewritten",
                expected_prev=st.prev,
                found_prev=record.prev,
            )
        if record.seq == 0 and record.kind == "run-start":
            self.run_key(record, st)
        foreign = record.kind == HEAD_KIND and self.foreign_head(record, st)
        if record.kind == HEAD_KIND and not foreign:
            self.check_head(record, st)
        self.check_claims(record, st)
        st.end.observe(record.kind, record.seq, record.step, record.payload)
        st.prev, st.last_seq, st.next_seq = record.digest, record.seq, record.seq + 1
        if not foreign:
            # A head by another signer after the final one (`ledger sign`) leaves the
            # stream as closed as it was: it vouches for nothing here.
            st.end.last_seq = record.seq

    def open_stream(self, number: int) -> _Stream:
        if self.current is not None:
            self.close_stream(self.current)
        st = _Stream(number)
        st.claims = sorted(self.pending.pop(number, []), key=lambda c: c.seq)
        self.streams[number] = st
        self.current = st
        st.key = self.key
        if number == RUN_STREAM and self.key is None and self.first is not None:
            st.key = self.read_run_key(self.first, st)
        st.key_id = key_id_of(st.key)
        return st

    def run_key(self, record: Record, st: _Stream) -> None:
        """Take the stream's key from its run-start record (seq 0)."""
        st.end.started = True
        if st.number == 0 and self.first is not None and self.first.digest != record.digest:
            self.emit(
                "TG1203",
                0,
                0,
                "the run-start record of stream 0 changed while the ledger was being verified",
            )
        key = self.read_run_key(record, st)
        if self.key is None:
            st.key, st.key_id = key, key_id_of(key)

    def read_run_key(self, record: Record, st: _Stream) -> Any:
        if record.seq != 0 or record.kind != "run-start":
            return None
        if RUN_KEY_FIELD not in record.payload:
            return None
        entry = record.payload[RUN_KEY_FIELD]
        if entry is None:
            st.end.key_state = "off"
            return None
        try:
            key, ident = key_from_entry(entry)
        except ValueError as exc:
            if st.number != record.stream:
                return None  # the run stream borrowing rank 0's key: stream 0 reports it
            st.end.key_state = "bad"
            self.emit(
                "TG1207",
                st.number,
                record.seq,
                f"the run-start record of stream {record.stream} carries a run key that "
                f"cannot be used: {exc}",
            )
            return None
        if st.number == record.stream:
            st.end.key_state, st.end.key_id = "ok", ident
        return key

    def content_intact(self, record: Record) -> bool:
        if not is_hex_digest(record.digest) or _UNREADABLE_KEY in record.payload:
            return False
        try:
            return _record_digest(record, record.seq) == record.digest
        except ValueError:
            return False

    def report_content(self, record: Record) -> bool:
        """Report a record whose digest fails; True if it was moved (not edited)."""
        moved_from = self.original_seq(record)
        if moved_from is not None:
            self.emit(
                "TG1204",
                record.stream,
                record.seq,
                f"the record at seq {record.seq} ({record.kind}) was written as seq "
                f"{moved_from}: records were reordered",
                written_as=moved_from,
            )
            return True
        reason = record.payload.get(_UNREADABLE_KEY)
        detail = f": {reason}" if isinstance(reason, str) else ""
        self.emit(
            "TG1201",
            record.stream,
            record.seq,
            f"record seq {record.seq} ({record.kind}, step {record.step}) does not hash to "
            f"its digest: it was edited after it was written{detail}",
            stored_digest=record.digest,
        )
        return False

    def original_seq(self, record: Record) -> int | None:
        if _UNREADABLE_KEY in record.payload or not is_hex_digest(record.digest):
            return None
        for distance in range(1, REORDER_WINDOW + 1):
            for seq in (record.seq - distance, record.seq + distance):
                if seq < 0 or self.probes >= MAX_REORDER_PROBES:
                    continue
                self.probes += 1
                try:
                    if _record_digest(record, seq) == record.digest:
                        return seq
                except ValueError:
                    return None
        return None

    # -- signed heads ---------------------------------------------------------
    def statement(self, record: Record, key: Any) -> Statement | None:
        envelope = record.payload.get("envelope")
        try:
            if key is not None:
                from trainguard.signing.dsse import verify_envelope
                from trainguard.signing.errors import VerificationError

                try:
                    if not isinstance(envelope, dict):
                        raise ValueError("the head carries no DSSE envelope")
                    data = verify_envelope(envelope, key, HEAD_PAYLOAD_TYPE)
                except VerificationError as exc:
                    reason = exc.findings[0].message if exc.findings else str(exc)
                    raise ValueError(reason) from None
            else:
                data = unverified_payload(envelope)
            return parse_statement(data)
        except ValueError as exc:
            self.emit(
                "TG1207",
                record.stream,
                record.seq,
                f"the signed head at seq {record.seq} does not verify: {exc}",
            )
            return None

    def foreign_head(self, record: Record, st: _Stream) -> bool:
        """A head that names another key id than the one its stream is checked with.

        Noted, never trusted: it covers nothing, so an attacker gains nothing by
        writing one, and someone who signed a finished run with their own key
        (`trainguard ledger sign`) does not break it.
        """
        signer = record.payload.get("key_id")
        if self.key is not None or st.key is None:
            return False  # a key given by the user: every head must verify with it
        if not isinstance(signer, str) or signer == st.key_id:
            return False
        self.emit(
            "TG1207",
            st.number,
            record.seq,
            f"the head at seq {record.seq} is signed by another key ({signer[:16]}) than "
            f"the one stream {st.number} is checked with ({st.key_id[:16]}): not checked "
            "and vouching for nothing (check it with --key)",
            severity=Severity.INFO,
            key_id=signer,
        )
        return True

    def check_head(self, record: Record, st: _Stream) -> None:
        statement = self.statement(record, st.key)
        if statement is None:
            return
        head = statement.head
        if (statement.run_id, head.stream, head.seq) != (self.run_id, st.number, record.seq - 1):
            self.emit(
                "TG1207",
                st.number,
                record.seq,
                f"the signed head at seq {record.seq} signs run {statement.run_id!r} stream "
                f"{head.stream} seq {head.seq}, not the record before it: it was copied here",
                signed_run=statement.run_id,
                signed_stream=head.stream,
                signed_seq=head.seq,
            )
            return
        signed = st.key is not None
        self.signatures += int(signed)
        if st.last_seq == head.seq:
            if head.digest != st.prev:
                self.emit(
                    "TG1206",
                    st.number,
                    head.seq,
                    f"the head at seq {record.seq} signed seq {head.seq} with another digest: "
                    "the chain up to it was rewritten after it was signed",
                    signed_digest=head.digest,
                    stored_digest=st.prev,
                )
            elif signed:
                st.cover = st.end.head_ok = record.seq
                if st.number == RUN_STREAM:
                    st.end.listed = frozenset(o.stream for o in statement.others)
        by = f"the signed run head at seq {record.seq}"
        for other in statement.others:
            if other.stream != RUN_STREAM:
                claim = _Claim(other.seq, other.digest, by, signed)
                self.pending.setdefault(other.stream, []).append(claim)

    def check_claims(self, record: Record, st: _Stream) -> None:
        while st.claim_index < len(st.claims) and st.claims[st.claim_index].seq <= record.seq:
            claim = st.claims[st.claim_index]
            st.claim_index += 1
            if claim.seq < record.seq:
                continue  # the claimed record is in a gap, already reported
            if claim.digest != record.digest:
                self.emit(
                    "TG1206",
                    st.number,
                    record.seq,
                    f"{claim.by} signed stream {st.number} seq {record.seq} with another "
                    "digest: the chain up to it was rewritten after it was signed",
                    signed_digest=claim.digest,
                    stored_digest=record.digest,
                )
            elif claim.signed:
                st.cover = max(st.cover, record.seq)
                st.end.vouched = True

    # -- the end --------------------------------------------------------------
    def close_stream(self, st: _Stream) -> None:
        beyond = st.claims[st.claim_index :]
        if beyond:
            claim = max(beyond, key=lambda c: c.seq)
            self.emit(
                "TG1205",
                st.number,
                st.last_seq + 1,
                f"{claim.by} says stream {st.number} reached seq {claim.seq}, but it ends at "
                f"seq {st.last_seq}: {claim.seq - st.last_seq} record(s) were cut off its end",
                signed_seq=claim.seq,
                last_seq=st.last_seq,
            )

    def finish(
        self, registered: Iterable[int], *, live: bool = False, expected: list[str] | None = None
    ) -> list[Finding]:
        if self.current is not None:
            self.close_stream(self.current)
        for number, claims in sorted(self.pending.items()):
            claim = max(claims, key=lambda c: c.seq)
            self.emit(
                "TG1205",
                number,
                0,
                f"{claim.by} says stream {number} reached seq {claim.seq}, but the stream "
                "has no records: all of them were deleted",
                signed_seq=claim.seq,
            )
        gone = set(registered) - set(self.streams) - set(self.pending)
        for number in sorted(gone):
            self.emit(
                "TG1202",
                number,
                0,
                f"stream {number} is registered for the run but has no records: all of them "
                "were deleted",
            )
        if self.key is not None:
            self.report_unsigned()
        elif any(st.key is not None for st in self.streams.values()):
            self.report_unsigned_tails()
        ends = {n: st.end for n, st in self.streams.items()}
        check_ends(
            ends,
            self.emit,
            pinned=self.key is not None,
            live=live,
            expected=expected,
            reported=gone | set(self.pending),
        )
        self.summarise_capped()
        return self.findings

    def run_keys(self) -> dict[int, str]:
        return {n: st.end.key_id for n, st in self.streams.items() if st.end.key_id is not None}

    def report_unsigned(self) -> None:
        if self.signatures == 0:
            self.emit(
                "TG1209",
                RUN_STREAM,
                None,
                f"no head of run {self.run_id!r} is signed by the given key: none of its "
                f"{self.records} records can be authenticated",
            )
            return
        self.report_unsigned_tails()

    def report_unsigned_tails(self) -> None:
        for st in sorted(self.streams.values(), key=lambda s: s.number):
            if st.last_seq > st.cover:
                count = st.last_seq - st.cover
                where = (
                    "come after its last signed head" if st.cover >= 0 else "have no signed head"
                )
                self.emit(
                    "TG1208",
                    st.number,
                    st.cover + 1,
                    f"{count} record(s) of stream {st.number} (seq {st.cover + 1}.."
                    f"{st.last_seq}) {where} and are not covered by a signature",
                    unsigned_from=st.cover + 1,
                    unsigned_to=st.last_seq,
                )


@dataclass(frozen=True)
class VerifyResult:
    findings: list[Finding]
    records: int
    streams: int
    signed_heads: int  # heads whose signature verified
    # stream -> the id of the run key its run-start names (taken from the ledger itself)
    run_keys: dict[int, str] = field(default_factory=dict)
    # stream -> the last seq a verified signature covers (-1: none); what a replay of that
    # stream can call authenticated
    covered: dict[int, int] = field(default_factory=dict)


def verify_run(
    ledger: Ledger,
    run_id: str,
    public_key: Any | None = None,
    *,
    live: bool = False,
    expect_key_ids: list[str] | None = None,
) -> VerifyResult:
    """:func:`verify_ledger` with the counts a report shows beside the findings."""
    from trainguard.signing.keys import public_key_from

    key = public_key_from(public_key) if public_key is not None else None
    location = str(getattr(ledger, "location", "ledger"))
    first = first_record(ledger, run_id) if key is None else None
    verifier = _Verifier(run_id, key, location, first)
    for record in ledger.records(run_id):
        verifier.feed(record)
    streams = getattr(ledger, "streams", None)
    registered: list[int] = list(streams(run_id)) if callable(streams) else []
    if verifier.records == 0 and not registered:
        raise LedgerError(f"{location}: no records for run {run_id!r}")
    findings = verifier.finish(registered, live=live, expected=expect_key_ids)
    return VerifyResult(
        findings,
        verifier.records,
        len(verifier.streams),
        verifier.signatures,
        verifier.run_keys(),
        {n: st.cover for n, st in verifier.streams.items()},
    )


def verify_ledger(
    ledger: Ledger,
    run_id: str,
    public_key: Any | None = None,
    *,
    live: bool = False,
    expect_key_ids: list[str] | None = None,
) -> list[Finding]:
    """Every break in the run's chains, as findings.

    An empty list means intact and every record covered by a verified head.
    Findings below high severity are not breaks: TG1208 (info) lists records
    written after the last signed head, TG1210 (medium) says the run is
    unsigned, a rank that died is explained at medium.

    Heads are checked with ``public_key`` (a key object or a PEM file path;
    then a run with no head signed by it is a finding), or else with each
    stream's run key from its run-start record.  A signed run must have ended:
    a run-end and a final signed head on every stream (``live``: a missing end
    is only noted).  ``expect_key_ids`` pins the run keys (prefixes of their
    hex ids): a stream rewritten whole with another key fails.  Raises
    :class:`LedgerError` if the run has no records at all.
    """
    return verify_run(ledger, run_id, public_key, live=live, expect_key_ids=expect_key_ids).findings
