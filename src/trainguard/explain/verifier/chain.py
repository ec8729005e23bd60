"""The verifier's own chain: only records it wrote, and heads it signs over those only.

The chain ``RUN/verify`` lives in the run's ledger, which the training process
can write to.  A signed head vouches for every record before it, so a verdict
(or an alert) the training process appended before the verifier's next head
would be covered by the verifier's signature.  Here every append and every
head is built inside the ledger's own insert (the store hands the builder the
stream's head as the insert will chain it): when that head is not a record
this verifier wrote, nothing is written there.  The foreign records are named
(TG1515, by the verifier) and the verifier goes on in a fresh stream of its
chain, so its signatures never cover them; `trainguard ledger verify
RUN/verify --key verifier.pub` lists them as records no signed head covers.

At start, records already in the chain that no head verified with the
verifier's key covers are named the same way (a verifier restarted on its own
earlier chain finds its signed streams clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.ledger.chain import HEAD_KIND, normalise_payload

MAX_MOVES = 1000  # fresh streams opened in one session before giving up (exit 2)


class ChainError(TrainguardError):
    """The verifier cannot write its chain (the CLI exits 2)."""


@dataclass(frozen=True)
class Foreign:
    stream: int
    first_seq: int
    last_seq: int


class _NotMine(Exception):
    def __init__(self, head: tuple[int, str]) -> None:
        super().__init__("a record the verifier did not write")
        self.head = head


class VerifierChain:
    """Appends to and signs ``chain`` in ``store`` with ``key`` (a private key object)."""

    def __init__(self, store: Any, chain: str, key: Any) -> None:
        self.store = store
        self.chain = chain
        self.key = key
        self.mine: set[str] = set()  # digests of the records written here
        self.found: list[Foreign] = []  # foreign stretches not yet named
        self._last_own: int = -1  # seq of the last own record in the current stream
        self.stream = -1  # chosen at the first write (training may still create the ledger)
        self._moves = 0

    def prepare(self) -> None:
        """Once, before the first write: a fresh stream, and the chain's earlier records no
        head signed with this key covers (in :attr:`found`)."""
        if self.stream < 0:
            self.stream = self._fresh_stream()
            self.found.extend(_unsigned(self.store, self.chain, self.key))

    def _fresh_stream(self) -> int:
        streams = streams_of(self.store, self.chain)
        return max(streams, default=-1) + 1

    def append(self, kind: str, payload: dict[str, Any], step: int | None) -> None:
        normal = normalise_payload(payload)
        self._write(kind, step, lambda: normal)

    def sign(self) -> None:
        from trainguard.ledger.heads import Statement, StreamHead, head_payload

        def build_head(head: tuple[int, str]) -> tuple[dict[str, Any], str]:
            statement = Statement(self.chain, StreamHead(self.stream, head[0], head[1]))
            return normalise_payload(head_payload(statement, self.key))

        if self._last_own >= 0:  # a fresh stream holds nothing of its own to sign yet
            self._write(HEAD_KIND, None, None, build_head)

    def _write(self, kind: str, step: int | None, make: Any, make_head: Any = None) -> None:
        self.prepare()
        while True:
            stream = self.stream

            def build(head: tuple[int, str] | None) -> tuple[dict[str, Any], str]:
                if head is not None and head[1] not in self.mine:
                    raise _NotMine(head)
                if make_head is not None:
                    if head is None:
                        raise ChainError("nothing of the verifier's to sign yet")
                    return make_head(head)  # type: ignore[no-any-return]
                return make()  # type: ignore[no-any-return]

            try:
                # The store's insert loop: ``build`` sees the head the record will follow.
                record = self.store._append(self.chain, stream, kind, step, build)
            except _NotMine as exc:
                self.found.append(Foreign(stream, self._last_own + 1, exc.head[0]))
                self._moves += 1
                if self._moves > MAX_MOVES:
                    raise ChainError(
                        f"{self.chain}: more than {MAX_MOVES} streams filled by another writer"
                    ) from None
                self.stream, self._last_own = self._fresh_stream(), -1
                if make_head is not None:
                    return  # nothing of its own in the fresh stream to sign yet
                continue
            self.mine.add(record.digest)
            self._last_own = record.seq
            return

    def take(self) -> list[Foreign]:
        found, self.found = self.found, []
        return found


def _unsigned(store: Any, chain: str, key: Any) -> list[Foreign]:
    """Stretches of the chain's existing streams that no head verified with ``key`` covers."""
    from trainguard.ledger.chain import LedgerError
    from trainguard.ledger.verify import verify_run

    if not streams_of(store, chain):
        return []
    try:
        result = verify_run(store, chain, key.public_key())
    except LedgerError:
        return []
    last: dict[int, int] = {}
    for r in store.records(chain):
        last[r.stream] = max(last.get(r.stream, -1), r.seq)
    return [
        Foreign(stream, result.covered.get(stream, -1) + 1, seq)
        for stream, seq in sorted(last.items())
        if seq > result.covered.get(stream, -1)
    ]


def streams_of(store: Any, run_id: str) -> list[int]:
    """The run's rank streams (>= 0) the store holds records of."""
    streams = getattr(store, "streams", None)
    if callable(streams):
        found = {int(s) for s in streams(run_id)}
    else:
        found = {r.stream for r in store.records(run_id)}
    return sorted(s for s in found if s >= 0)
