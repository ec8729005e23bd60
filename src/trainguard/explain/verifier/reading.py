"""Following a run's ledger: each record read once, its chain link checked as it arrives.

A verifier polls a run for hours; re-reading the ledger at each poll, or
before each recomputation, costs more the longer the run.  A
:class:`RunReader` keeps, per stream, the last sequence number read and the
digest it ended on: each read returns only the records after it, each checked
to continue its chain (sequence, ``prev``, digest), and feeds each rank's
:class:`~trainguard.explain.replay.ledger.HistoryReader`.  A recomputation
then replays from that history instead of reading and verifying the whole
run again.  Each signed head is verified as it arrives (:mod:`.heads`): a
chain re-hashed after records were deleted or edited fails at the first head
after the change, before any recomputation stands on it.  What only the whole
run shows (every stream's end) is verified once, at its end, by the verifier.

Fail closed: once a link breaks (an edited, deleted or moved record) or a
stream cannot be read into a history (a step recorded twice), :attr:`broken`
says why and :meth:`history` refuses from then on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trainguard.explain.replay.ledger import HistoryReader, ReplayError, RunHistory
from trainguard.explain.verifier.heads import HeadChecker
from trainguard.ledger.chain import GENESIS, Record, canonical_json, record_digest
from trainguard.ledger.store import UNREADABLE_KEY, SqlLedger


class RunReader:
    """Reads ``run_id`` from ``store`` incrementally (all streams, or the given ones)."""

    def __init__(
        self,
        store: Any,
        run_id: str,
        streams: list[int] | None = None,
        *,
        public_key: Any = None,
        expect_key_ids: list[str] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.only = streams
        self.broken: str | None = None  # the first reason the run cannot be recomputed
        self.broken_rule = "TG1203"  # the ledger rule of that reason
        self.heads = HeadChecker(
            run_id, public_key, expect_key_ids, anchor=streams is None or 0 in streams
        )
        self._last_step: dict[int, int] = {}  # stream -> the last step record read
        self._signed: dict[int, int | None] = {}  # stream -> the last step a head covers
        self._cursor: dict[int, int] = {}  # stream -> last seq read
        self._links: dict[int, tuple[int, str]] = {}  # stream -> last (seq, digest) read
        self._readers: dict[int, HistoryReader] = {}

    def new_records(self) -> Iterator[Record]:
        """The records not read before, each stream's in order, each link checked."""
        for r in self._unread():
            self._check_link(r)
            if r.stream >= 0 and self.broken is None:
                try:
                    reader = self._readers.setdefault(
                        r.stream, HistoryReader(self.run_id, r.stream)
                    )
                    reader.take(r)
                except ReplayError as exc:
                    self.broken = str(exc)
            yield r

    def history(self, rank: int) -> RunHistory:
        """The rank's history as read so far (ReplayError once the chain broke)."""
        if self.broken is not None:
            raise ReplayError(self.broken)
        if rank not in self._readers:
            raise ReplayError(f"no records for run {self.run_id!r} on stream {rank}")
        history = self._readers[rank].history()
        history.signed_through = self._signed.get(rank)
        return history

    def _unread(self) -> Iterator[Record]:
        if not isinstance(self.store, SqlLedger):  # a user's store: read all, skip the seen
            for r in self.store.records(self.run_id):
                if (self.only is None or r.stream in self.only) and r.seq > self._cursor.get(
                    r.stream, -1
                ):
                    self._cursor[r.stream] = r.seq
                    yield r
            return
        streams = self.only if self.only is not None else self.store.streams(self.run_id)
        for stream in streams:
            after = self._cursor.get(stream, -1)
            for r in self.store.records(self.run_id, stream, after_seq=after):
                self._cursor[stream] = max(self._cursor.get(stream, -1), r.seq)
                yield r

    def _check_link(self, r: Record) -> None:
        seq, prev = self._links.get(r.stream, (-1, GENESIS))
        self._links[r.stream] = (r.seq, r.digest)
        if self.broken is not None:
            return
        try:
            text = canonical_json(r.payload)
            digest = record_digest(r.run_id, r.stream, r.seq, r.kind, r.step, r.time, text, r.prev)
        except ValueError:
            digest = ""
        if r.seq != seq + 1 or r.prev != prev or digest != r.digest or UNREADABLE_KEY in r.payload:
            self.broken = (
                f"the ledger of run {self.run_id!r} does not verify at stream {r.stream} "
                f"seq {r.seq} (edited, moved or missing records); run `trainguard ledger verify`"
            )
            return
        problem = self.heads.feed(r, prev)
        if problem is not None:
            self.broken_rule = problem.rule
            self.broken = (
                f"the ledger of run {self.run_id!r} does not verify: {problem.message}; run "
                "`trainguard ledger verify`"
            )
            return
        before = self._last_step.get(r.stream)
        if r.kind == "step" and isinstance(r.step, int):
            self._last_step[r.stream] = r.step
        cover = self.heads.cover.get(r.stream, -1)
        if cover >= r.seq:  # a run head's claim on this very record
            self._signed[r.stream] = self._last_step.get(r.stream)
        elif cover == r.seq - 1:  # a head of the stream: everything before it
            self._signed[r.stream] = before
