"""The embedded ledger: one SQLite file, shared by every process of a run.

WAL mode lets readers (``trainguard ledger show``) work while ranks append,
and a transaction committed to the WAL survives the process being killed.
``synchronous=NORMAL`` (the default here) skips the fsync per commit: a crash
of the process loses nothing, a power cut may lose the last commits but never
corrupts the file (the ledger then verifies up to its last surviving record).
``sqlite:///path?synchronous=full`` fsyncs every append instead, at a cost of
one disk flush per record (docs/ledger.md has the numbers).

Several processes append to one file: each insert takes SQLite's write lock
(``BEGIN IMMEDIATE``) and waits up to :data:`BUSY_TIMEOUT_S` for it.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from trainguard.ledger.chain import LedgerError
from trainguard.ledger.store import SQL_INSERT, SqlLedger

BUSY_TIMEOUT_S = 60.0
SYNCHRONOUS = ("normal", "full")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS trainguard_ledger_records (
        run_id TEXT NOT NULL,
        stream INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        step INTEGER,
        wall_time REAL NOT NULL,
        payload TEXT NOT NULL,
        prev TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (run_id, stream, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS trainguard_ledger_streams (
        run_id TEXT NOT NULL,
        stream INTEGER NOT NULL,
        PRIMARY KEY (run_id, stream)
    ) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS trainguard_ledger_no_update
        BEFORE UPDATE ON trainguard_ledger_records
        BEGIN SELECT RAISE(ABORT, 'the trainguard ledger is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS trainguard_ledger_no_delete
        BEFORE DELETE ON trainguard_ledger_records
        BEGIN SELECT RAISE(ABORT, 'the trainguard ledger is append-only'); END""",
)
SQL_ADD_STREAM = "INSERT OR IGNORE INTO trainguard_ledger_streams (run_id, stream) VALUES (?, ?)"


class SqliteLedger(SqlLedger):
    def __init__(self, path: str, *, create: bool = True, synchronous: str = "normal") -> None:
        super().__init__(path)
        if synchronous.lower() not in SYNCHRONOUS:
            raise LedgerError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        self.path = path
        self._create = create
        self._synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> None:
        if not self._create and not os.path.isfile(self.path):
            raise LedgerError(f"{self.path}: no such ledger file")
        try:
            # isolation_level=None: this module issues BEGIN and COMMIT itself.
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # Only the two values of SYNCHRONOUS reach this line.
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            if self._create:
                self._set_up(conn)
            else:
                found = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                    "('trainguard_ledger_records', 'trainguard_ledger_streams')"
                ).fetchone()[0]
                if found != 2:
                    raise LedgerError(f"{self.path}: not a trainguard ledger")
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"{self.path}: cannot use the ledger: {exc}") from None
        except LedgerError:
            conn.close()
            raise
        self._conn = conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, retried while other processes do the same.

        Ranks of one run create the same file at once; switching the journal
        mode takes an exclusive lock that SQLite's busy timeout does not wait
        for, so "database is locked" here means "try again shortly".
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                # Persistent in the file: readers (create=False) need not set it,
                # so they can open a ledger they may not write.
                conn.execute("PRAGMA journal_mode = WAL")
                self._transaction(conn, [(sql, ()) for sql in _SCHEMA])
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02 + random.random() * 0.05)  # noqa: S311 - jitter, not a secret

    def _disconnect(self, *, inherited: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not inherited:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None, "used before _ready()"
        return self._conn

    @staticmethod
    def _transaction(conn: sqlite3.Connection, statements: list[tuple[str, Sequence[Any]]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger: {exc}") from None

    batches_appends = True

    def _insert(self, row: Sequence[Any], new_stream: bool) -> bool:
        return self._insert_many([row], new_stream)

    def _insert_many(self, rows: Sequence[Sequence[Any]], new_stream: bool) -> bool:
        statements: list[tuple[str, Sequence[Any]]] = [(SQL_INSERT, row) for row in rows]
        if new_stream and rows:
            statements.append((SQL_ADD_STREAM, (rows[0][0], rows[0][1])))
        try:
            self._transaction(self._connection(), statements)
        except sqlite3.IntegrityError as exc:
            # Only the key means "someone else appended first"; any other
            # constraint failing would fail again on every try.
            if "UNIQUE" in str(exc):
                return False
            raise LedgerError(f"{self.path}: cannot append to the ledger: {exc}") from None
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot append to the ledger: {exc}") from None
        return True
