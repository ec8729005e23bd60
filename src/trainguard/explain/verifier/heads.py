"""Signed heads checked as the verifier reads them, so no recomputation runs on a forgery.

The verifier reads a run incrementally (:mod:`.reading`), checking each
record's link to the one before.  Links alone prove a consistent chain, not
the run's: someone who can write the database can delete records and re-hash
the rest.  The training process signs a head of its stream every
``sign_every`` steps with its run key; each head names the digest of the
record before it.  :class:`HeadChecker` verifies each head as it arrives
(signature, run, stream, seq and digest), under the key rules of ``trainguard
ledger verify``: a key given by the user checks every head; otherwise each
stream's run key from its run-start record, rank 0's held to
``--expect-key-id`` when pinned, another rank's to the pins or to the key ids
rank 0's run-start names (``run_keys``).  A run head's claims about rank
streams are checked against the digests read (the last :data:`RECENT` of each
stream; an older claim was already covered by that stream's own heads).

:attr:`HeadChecker.cover` is, per stream, the last seq a verified head covers:
what a verdict can call signed.  A failure is a :class:`HeadProblem` (rule,
message); the reader stops there (fail closed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from trainguard.ledger.chain import HEAD_KIND, HEAD_PAYLOAD_TYPE, RUN_STREAM, Record
from trainguard.ledger.runkey import RUN_KEY_FIELD, key_from_entry, key_id_matches, key_id_of

RECENT = 4096  # digests kept per stream to check a run head's claims (bounded memory)


@dataclass(frozen=True)
class HeadProblem:
    rule: str
    message: str


class HeadChecker:
    """Checks the signed heads of ``run_id`` record by record (see the module)."""

    def __init__(
        self,
        run_id: str,
        public_key: Any = None,
        expect_key_ids: list[str] | None = None,
        *,
        anchor: bool = True,
    ) -> None:
        from trainguard.signing.keys import public_key_from

        self.run_id = run_id
        self.given = public_key_from(public_key) if public_key is not None else None
        self.expected = expect_key_ids
        self.keys: dict[int, Any] = {}  # stream -> its key (None: unsigned)
        self.key_ids: dict[int, str] = {}
        # rank 0's run_keys (every rank's key id, by rank); None: its run-start not read yet
        self.peers: list[Any] | None = None
        # anchor False: a reader of one rank's stream (the verifier's rank servers) whose
        # keys the verifier's own reader, which reads rank 0 too, anchors.
        self.anchor = anchor
        self._unanchored: list[tuple[int, str]] = []  # read before rank 0's run-start
        self.cover: dict[int, int] = {}  # stream -> last seq a verified head covers
        self.unsigned: set[int] = set()  # streams whose run-start turned signing off
        self._recent: dict[int, deque[tuple[int, str]]] = {}
        self._pending: dict[int, list[tuple[int, str]]] = {}  # claims ahead of the reading
        # Run heads read before rank 0's run-start (whose key checks them): checked then.
        self._deferred: list[tuple[Record, str]] = []

    def feed(self, record: Record, prev_digest: str) -> HeadProblem | None:
        """One record, read after the record whose digest is ``prev_digest``."""
        n = record.stream
        if record.seq == 0 and record.kind == "run-start":
            problem = self._run_key(record)
            if problem is not None:
                return problem
        problem = self._claimed(record)
        if problem is None and record.kind == HEAD_KIND:
            problem = self._head(record, prev_digest)
        recent = self._recent.setdefault(n, deque(maxlen=RECENT))
        recent.append((record.seq, record.digest))
        return problem

    # -- keys -------------------------------------------------------------------------
    def _run_key(self, record: Record) -> HeadProblem | None:
        n = record.stream
        if n == 0:
            listed = record.payload.get("run_keys")
            self.peers = list(listed) if isinstance(listed, list) else []
        if self.given is not None:
            self.keys[n], self.key_ids[n] = self.given, key_id_of(self.given)
            return None
        entry = record.payload.get(RUN_KEY_FIELD)
        if entry is None:
            self.keys[n] = None
            self.unsigned.add(n)
            if n == 0:
                self._deferred = []  # an unsigned run: its run heads check nothing
            if self.expected is not None:
                return HeadProblem(
                    "TG1213",
                    f"stream {n} carries no run key, but run keys are pinned (--expect-key-id): "
                    "it was rewritten whole without one",
                )
            return None
        try:
            key, ident = key_from_entry(entry)
        except ValueError as exc:
            return HeadProblem("TG1207", f"stream {n}'s run-start carries an unusable key: {exc}")
        anchored = self._anchored(n, ident)
        if anchored is not None:
            return anchored
        self.keys[n], self.key_ids[n] = key, ident
        if n != 0:
            return None
        for other, other_id in self._unanchored:
            problem = self._anchored(other, other_id)
            if problem is not None:
                return problem
        return self._run_deferred()

    def _run_deferred(self) -> HeadProblem | None:
        deferred, self._deferred = self._deferred, []
        for record, prev in deferred:
            problem = self._head(record, prev)
            if problem is not None:
                return problem
        return None

    def _anchored(self, n: int, ident: str) -> HeadProblem | None:
        pinned = self.expected is not None and key_id_matches(ident, self.expected)
        if n == 0 or n == RUN_STREAM:
            if self.expected is not None and not pinned:
                return HeadProblem(
                    "TG1213",
                    f"stream {n}'s run key {ident[:16]} is not a pinned key id "
                    "(--expect-key-id): the stream was rewritten whole with another key",
                )
            return None
        if pinned or not self.anchor:
            return None
        if self.peers is None:  # checked when rank 0's run-start is read
            self._unanchored.append((n, ident))
            return None
        if 0 <= n < len(self.peers) and self.peers[n] == ident:
            return None
        return HeadProblem(
            "TG1213",
            f"stream {n}'s run key {ident[:16]} is neither pinned nor named by rank 0's "
            "run-start (run_keys): its heads prove nothing",
        )

    # -- heads ------------------------------------------------------------------------
    def _head(self, record: Record, prev_digest: str) -> HeadProblem | None:
        from trainguard.ledger.heads import parse_statement
        from trainguard.signing.dsse import verify_envelope
        from trainguard.signing.errors import VerificationError

        n = record.stream
        key = self.keys.get(n)
        if n == RUN_STREAM and key is None:
            if 0 not in self.keys:  # read before rank 0's run-start: checked with its key
                self._deferred.append((record, prev_digest))
                return None
            key = self.keys[0]  # the run stream's heads are rank 0's (ledger/verify.py)
        if key is None:
            return None  # an unsigned stream: the chain is all there is (said in the verdict)
        signer = record.payload.get("key_id")
        if self.given is None and isinstance(signer, str) and signer != key_id_of(key):
            return None  # another signer (`ledger sign`): vouches for nothing here
        envelope = record.payload.get("envelope")
        try:
            if not isinstance(envelope, dict):
                raise ValueError("the head carries no DSSE envelope")
            statement = parse_statement(verify_envelope(envelope, key, HEAD_PAYLOAD_TYPE))
        except (ValueError, VerificationError) as exc:
            return HeadProblem(
                "TG1207", f"the signed head at stream {n} seq {record.seq} does not verify: {exc}"
            )
        head = statement.head
        if (statement.run_id, head.stream, head.seq) != (self.run_id, n, record.seq - 1):
            return HeadProblem(
                "TG1207",
                f"the signed head at stream {n} seq {record.seq} signs run "
                f"{statement.run_id!r} stream {head.stream} seq {head.seq}: it was copied here",
            )
        if head.digest != prev_digest:
            return HeadProblem(
                "TG1206",
                f"the head at stream {n} seq {record.seq} signed seq {head.seq} with another "
                "digest: the chain up to it was rewritten after it was signed",
            )
        self.cover[n] = head.seq
        for other in statement.others:
            problem = self._claim(other.stream, other.seq, other.digest)
            if problem is not None:
                return problem
        return None

    def _claim(self, stream: int, seq: int, digest: str) -> HeadProblem | None:
        if stream == RUN_STREAM:
            return None
        recent = self._recent.get(stream)
        last = recent[-1][0] if recent else -1
        if seq > last:
            self._pending.setdefault(stream, []).append((seq, digest))
            return None
        found = next((d for s, d in reversed(recent or ()) if s == seq), None)
        if found is None:
            return None  # older than the window: that stream's own heads covered it
        if found != digest:
            return self._claim_problem(stream, seq)
        self.cover[stream] = max(self.cover.get(stream, -1), seq)
        return None

    def _claimed(self, record: Record) -> HeadProblem | None:
        """A record a run head (read earlier) made a claim about."""
        pending = self._pending.get(record.stream)
        if not pending:
            return None
        for seq, digest in [c for c in pending if c[0] == record.seq]:
            if digest != record.digest:
                return self._claim_problem(record.stream, seq)
            self.cover[record.stream] = max(self.cover.get(record.stream, -1), seq)
        self._pending[record.stream] = [c for c in pending if c[0] > record.seq]
        return None

    def _claim_problem(self, stream: int, seq: int) -> HeadProblem:
        return HeadProblem(
            "TG1206",
            f"a signed run head names stream {stream} seq {seq} with another digest: the "
            "chain up to it was rewritten after it was signed",
        )
