"""Appends that outlive a database outage: buffered in order, written when it returns.

A shared ledger server restarts (an upgrade, a failover) while hundreds of ranks
train.  Failing every rank's step for it would turn a ledger outage into a
training outage; dropping the records would open a hole an insider could hide
in.  Instead each append that finds the server gone is queued in memory (its
wall time kept), the connection is retried at most every ``RETRY_SECONDS``,
and when it is back the queue is written in order through the normal chained
append, followed by one ``ledger-outage`` record per stream that says when the
server was unreachable and how many records were written late.

Never silent: past ``MAX_BUFFERED`` queued records, or at ``close()`` when the
server has not come back within ``CLOSE_WAIT_SECONDS``, the append raises
:class:`LedgerError` with the count that is not in the ledger.

An append whose connection broke during its commit may or may not have landed;
before writing it again the stream's last record is compared (kind, step and
the exact wall time it was made with), so it is not written twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainguard.ledger.chain import LedgerError, Record, normalise_payload

MAX_BUFFERED = 20_000  # records; a step record is 1-2 kB, so at most some 40 MB
RETRY_SECONDS = 1.0
CLOSE_WAIT_SECONDS = 30.0
OUTAGE_KIND = "ledger-outage"
SQL_LAST = (
    "SELECT kind, step, wall_time FROM trainguard_ledger_records "
    "WHERE run_id = ? AND stream = ? ORDER BY seq DESC LIMIT 1"
)


@dataclass
class Pending:
    run_id: str
    stream: int
    kind: str
    step: int | None
    build: Callable[[tuple[int, str] | None], tuple[dict[str, Any], str]]
    when: float
    in_flight: bool = False  # its first try broke mid-commit: it may have landed


class OutageBuffer:
    """Mixed into an :class:`~trainguard.ledger.store.SqlLedger` whose server can go away.

    The store's ``_broken()`` sets ``_pid`` to -1: that is how an append tells a
    lost connection from any other error (those still raise at once).
    """

    _lock: Any
    _pid: int
    location: str

    def _buffer_init(self) -> None:
        self._queue: deque[Pending] = deque()
        self._retry_at = 0.0
        self._when: float | None = None
        self.outages = 0  # how many outages this ledger rode out (for reports and tests)

    def _append(self, run_id: str, stream: int, kind: str, step: int | None, build: Any) -> Record:
        with self._lock:
            item = Pending(run_id, stream, kind, step, build, time.time())
            if self._queue and not self._flush():
                return self._enqueue(item)
            try:
                return self._write(item)
            except LedgerError:
                if self._pid != -1:
                    raise  # the server answered: a real error, not an outage
                item.in_flight = True
                self._retry_at = time.monotonic() + RETRY_SECONDS
                return self._enqueue(item)

    def _record_time(self) -> float:
        return self._when if self._when is not None else time.time()

    def _write(self, item: Pending) -> Record:
        self._when = item.when
        try:
            record: Record = super()._append(  # type: ignore[misc]
                item.run_id, item.stream, item.kind, item.step, item.build
            )
        finally:
            self._when = None
        return record

    def _enqueue(self, item: Pending) -> Record:
        if len(self._queue) >= MAX_BUFFERED:
            raise LedgerError(
                f"{self.location}: unreachable since {self._queue[0].when:.0f}; "
                f"{len(self._queue)} records are waiting and this one is not in the ledger"
            )
        self._queue.append(item)
        # Not written yet: no sequence number or digest (the caller only needs the call
        # to succeed; the record gets both when the queue is written).
        return Record(item.run_id, item.stream, -1, item.kind, item.step, item.when, {}, "", "")

    def _flush(self) -> bool:
        """Write the queue if the server is back; False while it is not."""
        if time.monotonic() < self._retry_at:
            return False
        self._retry_at = time.monotonic() + RETRY_SECONDS
        streams: dict[tuple[str, int], list[float]] = {}
        try:
            while self._queue:
                item = self._queue[0]
                if not (item.in_flight and self._landed(item)):
                    self._write(item)
                span = streams.setdefault((item.run_id, item.stream), [item.when, item.when, 0])
                span[1] = item.when
                span[2] += 1
                self._queue.popleft()
        except LedgerError:
            if self._pid != -1:
                raise
            return False
        self.outages += 1
        for (run_id, stream), (first, last, count) in streams.items():
            payload = {"first": first, "last": last, "written_late": int(count)}
            self._write(Pending(run_id, stream, OUTAGE_KIND, None, _fixed(payload), time.time()))
        return True

    def _landed(self, item: Pending) -> bool:
        rows = self._locked_query(SQL_LAST, (item.run_id, item.stream))  # type: ignore[attr-defined]
        if not rows:
            return False
        kind, step, when = rows[0]
        return bool(kind == item.kind and step == item.step and when == item.when)

    def _drain(self) -> None:
        """At close: wait for the server a while, then say what could not be written."""
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while self._queue and time.monotonic() < deadline:
            self._retry_at = 0.0
            if self._flush():
                return
            time.sleep(RETRY_SECONDS)
        if self._queue:
            lost = len(self._queue)
            self._queue.clear()
            raise LedgerError(
                f"{self.location}: closed while unreachable: {lost} records could not be written"
            )


def _fixed(
    payload: dict[str, Any],
) -> Callable[[tuple[int, str] | None], tuple[dict[str, Any], str]]:
    """A payload builder that ignores the head (what ``append`` passes for plain records)."""
    normal = normalise_payload(payload)
    return lambda _head: normal
