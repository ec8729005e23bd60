"""What the SQLite and PostgreSQL ledgers share: appending, reading, signing heads.

Both keep two tables.  ``trainguard_ledger_records`` holds the records, keyed
by ``(run_id, stream, seq)``; that key is what makes appends safe without a
lock held across processes: a writer inserts ``seq = head + 1`` chained onto
the head it knows, and if another writer got there first the insert fails on
the key, the writer reads the new head and tries again.  Each insert is one
transaction, so a process killed mid-append leaves either the whole record or
nothing.  ``trainguard_ledger_streams`` lists the streams of each run (one row
per stream, written with its first record) so that listing runs and heads
does not scan every record.  Triggers refuse UPDATE and DELETE: the tables
are append-only to anyone who does not drop the triggers first (and verify
catches those who do).

Nothing read back is trusted: a row whose columns have the wrong types or a
payload that is not canonical JSON comes back as a record whose payload says
so (:data:`UNREADABLE_KEY`), and verification then reports it as modified.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from trainguard.ledger.chain import (
    GENESIS,
    HEAD_KIND,
    MAX_PAYLOAD_CHARS,
    RUN_STREAM,
    LedgerError,
    Record,
    canonical_json,
    check_fields,
    make_record,
    normalise_payload,
    parse_payload,
)
from trainguard.ledger.heads import Statement, StreamHead, head_payload

RECORDS = "trainguard_ledger_records"
STREAMS = "trainguard_ledger_streams"
# Stands in for a payload that could not be read back; verification reports it.
UNREADABLE_KEY = "trainguard:unreadable"
# Every failed try means another writer appended to the same stream, so this
# many in a row only happens under pathological contention.
MAX_APPEND_TRIES = 1000
PAGE_SIZE = 2000

_COLUMNS = "run_id, stream, seq, kind, step, wall_time, payload, prev, digest"
SQL_HEAD = (
    "SELECT seq, digest FROM trainguard_ledger_records "
    "WHERE run_id = ? AND stream = ? ORDER BY seq DESC LIMIT 1"
)
SQL_INSERT = (
    "INSERT INTO trainguard_ledger_records "
    "(run_id, stream, seq, kind, step, wall_time, payload, prev, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# ``{extra}``: columns a backend reads besides the record's (PostgreSQL's server time).
SQL_PAGE = (
    "SELECT run_id, stream, seq, kind, step, wall_time, payload, prev, digest{extra} "
    "FROM trainguard_ledger_records WHERE run_id = ? AND (stream, seq) > (?, ?) "
    "ORDER BY stream, seq LIMIT ?"
)
SQL_PAGE_STREAM = (
    "SELECT run_id, stream, seq, kind, step, wall_time, payload, prev, digest{extra} "
    "FROM trainguard_ledger_records WHERE run_id = ? AND stream = ? AND seq > ? "
    "ORDER BY seq LIMIT ?"
)
SQL_RUNS = "SELECT DISTINCT run_id FROM trainguard_ledger_streams ORDER BY run_id"
SQL_STREAMS = "SELECT stream FROM trainguard_ledger_streams WHERE run_id = ? ORDER BY stream"
SQL_STREAM_HEADS = (
    "SELECT r.stream, r.seq, r.digest FROM trainguard_ledger_streams s "
    "JOIN trainguard_ledger_records r ON r.run_id = s.run_id AND r.stream = s.stream "
    "WHERE s.run_id = ? AND r.seq = (SELECT MAX(m.seq) FROM trainguard_ledger_records m "
    "WHERE m.run_id = s.run_id AND m.stream = s.stream) ORDER BY r.stream"
)

Row = Sequence[Any]
PayloadBuilder = Callable[[tuple[int, str] | None], tuple[dict[str, Any], str]]


class SqlLedger(ABC):
    """A ledger in an SQL database; subclasses supply the connection.

    Safe to share between threads (one lock around the connection) and across
    ``fork``: a child process opens its own connection on first use.
    """

    def __init__(self, location: str) -> None:
        # ``location`` names the ledger in messages; it never holds a password.
        self.location = location
        self._lock = threading.RLock()
        self._pid = -1
        self._closed = False
        # The last (seq, digest) this process wrote per stream.  Only a hint:
        # a stale one makes the insert fail on the key, and the head is re-read.
        self._heads: dict[tuple[str, int], tuple[int, str]] = {}

    # -- what a backend provides ----------------------------------------------
    @abstractmethod
    def _connect(self) -> None:
        """Open the connection and create the tables if they are missing."""

    @abstractmethod
    def _disconnect(self, *, inherited: bool) -> None:
        """Drop the connection (an ``inherited`` one is abandoned, not closed)."""

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Rows of a read-only statement (``?`` placeholders)."""

    @abstractmethod
    def _insert(self, row: Sequence[Any], new_stream: bool) -> bool:
        """Insert one record in one transaction; False if its key already exists."""

    def _insert_many(self, rows: Sequence[Sequence[Any]], new_stream: bool) -> bool:
        """Insert consecutive records of one stream in one transaction (all or none);
        False if a key already exists.  Only where :attr:`batches_appends` is set."""
        raise NotImplementedError

    # Whether append_many writes in one transaction (a backend with _insert_many).
    batches_appends = False

    # -- the Ledger protocol --------------------------------------------------
    def append_many(
        self, run_id: str, stream: int, items: Sequence[tuple[str, int | None, float, Any]]
    ) -> list[Record]:
        """Consecutive records of one stream, ``(kind, step, wall time, normal)`` each
        (``normal``: what :func:`normalise_payload` made of the payload when the record
        was made, so a later change to the caller's dict cannot reach it), written in
        one transaction, each with the wall time it was made: a writer that
        holds its records a while (the guard's step records, monitor/recorder.py) pays
        one commit for them.  Chained exactly as one append each would chain them."""
        for kind, step, _, _ in items:
            check_fields(run_id, kind, step, stream)
            if kind == HEAD_KIND:
                raise ValueError("records of kind 'head' are written by sign_head() only")
        if not items:
            return []
        normal = list(items)
        with self._lock:
            self._ready()
            key = (run_id, stream)
            for _ in range(MAX_APPEND_TRIES):
                head = self._heads.get(key)
                if head is None:
                    rows = self._query(SQL_HEAD, (run_id, stream))
                    head = (int(rows[0][0]), str(rows[0][1])) if rows else None
                seq, prev = (0, GENESIS) if head is None else (head[0] + 1, head[1])
                first = seq
                records, batch = [], []
                for kind, step, when, (payload, text) in normal:
                    record = make_record(run_id, stream, seq, kind, step, when, payload, text, prev)
                    records.append(record)
                    batch.append((run_id, stream, seq, kind, step, when, text, prev, record.digest))
                    seq, prev = seq + 1, record.digest
                if self._insert_many(batch, new_stream=first == 0):
                    self._heads[key] = (seq - 1, prev)
                    return records
                self._heads.pop(key, None)
            raise LedgerError(
                f"{self.location}: could not append to run {run_id!r} stream {stream}: "
                f"{MAX_APPEND_TRIES} other appends won the race"
            )

    def append(
        self,
        run_id: str,
        kind: str,
        payload: dict[str, Any],
        *,
        step: int | None = None,
        stream: int = RUN_STREAM,
    ) -> Record:
        check_fields(run_id, kind, step, stream)
        if kind == HEAD_KIND:
            raise ValueError("records of kind 'head' are written by sign_head() only")
        normal = normalise_payload(payload)
        return self._append(run_id, stream, kind, step, lambda _head: normal)

    def records(
        self, run_id: str, stream: int | None = None, *, after_seq: int = -1
    ) -> Iterator[Record]:
        """Every record of the run, ordered by (stream, seq), read page by page.

        ``after_seq`` (with ``stream``): only the records after that one, so that a
        reader following a run reads each record once."""
        if stream is None and after_seq != -1:
            raise ValueError("after_seq counts within one stream: give the stream")
        last_stream: Any = RUN_STREAM - 1
        last_seq: Any = after_seq
        extra = self._extra_columns()
        while True:
            if stream is None:
                params: tuple[Any, ...] = (run_id, last_stream, last_seq, PAGE_SIZE)
                rows = self._locked_query(SQL_PAGE.format(extra=extra), params)
            else:
                params = (run_id, stream, last_seq, PAGE_SIZE)
                rows = self._locked_query(SQL_PAGE_STREAM.format(extra=extra), params)
            for row in rows:
                # The raw key, not the decoded one: the next page must start after
                # this row as the database orders it, whatever a tampered row holds.
                last_stream, last_seq = row[1], row[2]
                yield decode_row(row)
            if len(rows) < PAGE_SIZE:
                return

    def runs(self) -> list[str]:
        return [str(row[0]) for row in self._locked_query(SQL_RUNS, ())]

    def streams(self, run_id: str) -> list[int]:
        """The streams registered for a run (with their first record)."""
        return [int(row[0]) for row in self._locked_query(SQL_STREAMS, (run_id,))]

    def sign_head(self, run_id: str, stream: int, private_key: Any) -> Record:
        """Append a signed head naming the stream's last record (see :mod:`.heads`)."""
        check_fields(run_id, HEAD_KIND, None, stream)
        from trainguard.signing.keys import private_key_from

        key = private_key_from(private_key)

        def build(head: tuple[int, str] | None) -> tuple[dict[str, Any], str]:
            if head is None:
                raise LedgerError(f"run {run_id!r} stream {stream} has no record to sign")
            others: tuple[StreamHead, ...] = ()
            if stream == RUN_STREAM:
                rows = self._locked_query(SQL_STREAM_HEADS, (run_id,))
                others = tuple(
                    StreamHead(int(s), int(q), str(d)) for s, q, d in rows if s != RUN_STREAM
                )
            statement = Statement(run_id, StreamHead(stream, head[0], head[1]), others)
            return normalise_payload(head_payload(statement, key))

        return self._append(run_id, stream, HEAD_KIND, None, build)

    def close(self) -> None:
        with self._lock:
            if not self._closed and self._pid == os.getpid():
                self._disconnect(inherited=False)
            self._closed = True

    def __enter__(self) -> SqlLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared machinery -----------------------------------------------------
    def _ready(self) -> None:
        """Connect on first use, and again in a child process after fork."""
        if self._closed:
            raise LedgerError(f"{self.location}: the ledger is closed")
        pid = os.getpid()
        if self._pid != pid:
            if self._pid != -1:
                # The parent's connection must not be used or closed here.
                self._disconnect(inherited=True)
                self._heads.clear()
            self._connect()
            self._pid = pid

    def _broken(self) -> None:
        """Forget a connection that failed; the next call opens a new one.

        The heads are forgotten too: an append whose commit was cut off may or
        may not have landed, so the next one reads the head from the database.
        """
        self._disconnect(inherited=False)
        self._heads.clear()
        self._pid = -1

    def _extra_columns(self) -> str:
        """SQL for columns read after the record's own (``, expr``), passed to
        :func:`decode_row`: PostgreSQL's server time; nothing here."""
        return ""

    def _record_time(self) -> float:
        """The wall time a new record carries (a buffered one keeps the time it was made)."""
        return time.time()

    def _locked_query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._lock:
            self._ready()
            return self._query(sql, params)

    def _append(
        self, run_id: str, stream: int, kind: str, step: int | None, build: PayloadBuilder
    ) -> Record:
        with self._lock:
            self._ready()
            key = (run_id, stream)
            for _ in range(MAX_APPEND_TRIES):
                head = self._heads.get(key)
                if head is None:
                    rows = self._query(SQL_HEAD, (run_id, stream))
                    head = (int(rows[0][0]), str(rows[0][1])) if rows else None
                payload, text = build(head)
                seq, prev = (0, GENESIS) if head is None else (head[0] + 1, head[1])
                record = make_record(
                    run_id, stream, seq, kind, step, self._record_time(), payload, text, prev
                )
                row = (run_id, stream, seq, kind, step, record.time, text, prev, record.digest)
                if self._insert(row, new_stream=seq == 0):
                    self._heads[key] = (seq, record.digest)
                    return record
                self._heads.pop(key, None)
            raise LedgerError(
                f"{self.location}: could not append to run {run_id!r} stream {stream}: "
                f"{MAX_APPEND_TRIES} other appends won the race"
            )


def decode_row(row: Row) -> Record:
    """A stored row as a record, whatever its columns hold."""
    run_id, stream, seq, kind, step, wall_time, text, prev, digest, *extra = row
    # Not hashed, so not checked: a value that is not a number is no server time.
    stamp = extra[0] if extra else None
    server_time = None
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        server_time = float(stamp)
    problems: list[str] = []

    def integer(value: object, name: str, default: int) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{name} is not an integer")
        return default

    stream_i = integer(stream, "stream", RUN_STREAM - 1)
    seq_i = integer(seq, "seq", -1)
    step_i = None if step is None else integer(step, "step", -1)
    if isinstance(wall_time, int | float) and not isinstance(wall_time, bool):
        time_f = float(wall_time)
    else:
        problems.append("time is not a number")
        time_f = float("nan")
    strings = {"run_id": run_id, "kind": kind, "prev": prev, "digest": digest}
    for name, value in strings.items():
        if not isinstance(value, str):
            problems.append(f"{name} is not text")
            strings[name] = ""
    payload: dict[str, Any]
    if not isinstance(text, str):
        problems.append("payload is not text")
        payload = {}
    elif len(text) > MAX_PAYLOAD_CHARS:
        # A writer refuses this much (chain.normalise_payload): someone else stored it,
        # and it is not parsed (or hashed) at whatever size they chose.
        problems.append(
            f"payload is {len(text)} characters, over the limit {MAX_PAYLOAD_CHARS} that "
            "every writer keeps: not written by the ledger"
        )
        payload = {}
    else:
        try:
            payload = parse_payload(text)
            if canonical_json(payload) != text:
                problems.append("payload is not stored in canonical form")
        except ValueError as exc:
            problems.append(str(exc))
            payload = {}
    if problems:
        payload = {UNREADABLE_KEY: "; ".join(problems), "readable": payload}
    return Record(
        str(strings["run_id"]),
        stream_i,
        seq_i,
        str(strings["kind"]),
        step_i,
        time_f,
        payload,
        str(strings["prev"]),
        str(strings["digest"]),
        server_time,
    )
