"""Where the store guard remembers what it decided: SQLite by default, PostgreSQL when shared.

One row per path holds the latest verdict and the stat it was made for, so a
restarted guard rescans nothing whose (device, inode, size, mtime, ctime) is
unchanged; every decision is also appended to a history table, so a file that
was quarantined and later replaced by a clean one keeps both records.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainguard.errors import MissingExtraError, UsageError

# The stat fields a verdict is valid for; any change means "scan again".
StatKey = tuple[int, int, int, int, int]


def db_name(rel: str) -> str:
    """A path as the verdict store and reports spell it: itself when it is valid UTF-8.

    File names are bytes; one that is not UTF-8 (``b"\\xff"``) cannot be stored
    as text or printed. It is spelt ``%bytes:`` + hex, which no valid name maps to
    (a valid name starting with that prefix is spelt in hex too), so two names
    never share a verdict.
    """
    raw = os.fsencode(rel)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "%bytes:" + raw.hex()
    return "%bytes:" + raw.hex() if text.startswith("%bytes:") else text


def shown(path: str) -> str:
    """A path for notes and messages: undecodable bytes as \\xNN (display only, not a key)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Verdict:
    path: str  # relative to the store root, '/'-separated
    key: StatKey
    outcome: str  # "clean", "quarantined", "error"
    severity: str  # highest finding severity, "" when none
    findings: list[dict[str, object]] = field(default_factory=list)
    moved_to: str = ""  # where a quarantined file now lies
    decided_at: float = field(default_factory=time.time)


class VerdictStore(Protocol):
    def known(self, path: str) -> StatKey | None: ...
    def record(self, verdict: Verdict) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def history(self, path: str) -> list[Verdict]: ...
    def close(self) -> None: ...


_TABLES = (
    "CREATE TABLE IF NOT EXISTS store_latest (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
    "outcome TEXT NOT NULL, severity TEXT NOT NULL, decided_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS store_history (path TEXT NOT NULL, stat TEXT NOT NULL, "
    "outcome TEXT NOT NULL, severity TEXT NOT NULL, findings TEXT NOT NULL, "
    "moved_to TEXT NOT NULL, decided_at DOUBLE PRECISION NOT NULL)",
)


class _SqlStore:
    """The SQL both back ends share; ``mark`` is the driver's placeholder."""

    mark = "?"

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the HTTP thread reads counts while the loop writes
        with self._lock:
            for statement in _TABLES:
                self._conn.execute(statement)
            self._conn.commit()

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.mark)

    def known(self, path: str) -> StatKey | None:
        with self._lock:
            row = self._conn.execute(
                self._q("SELECT stat FROM store_latest WHERE path = ?"), (path,)
            ).fetchone()
        if row is None:
            return None
        a, b, c, d, e = (int(x) for x in json.loads(row[0]))
        return (a, b, c, d, e)

    def record(self, verdict: Verdict) -> None:
        stat = json.dumps(list(verdict.key))
        with self._lock:
            self._conn.execute(self._q("DELETE FROM store_latest WHERE path = ?"), (verdict.path,))
            self._conn.execute(
                self._q("INSERT INTO store_latest VALUES (?, ?, ?, ?, ?)"),
                (verdict.path, stat, verdict.outcome, verdict.severity, verdict.decided_at),
            )
            self._conn.execute(
                self._q("INSERT INTO store_history VALUES (?, ?, ?, ?, ?, ?, ?)"),
                (
                    verdict.path,
                    stat,
                    verdict.outcome,
                    verdict.severity,
                    json.dumps(verdict.findings, sort_keys=True),
                    verdict.moved_to,
                    verdict.decided_at,
                ),
            )
            self._conn.commit()

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT outcome, COUNT(*) FROM store_latest GROUP BY outcome"
            ).fetchall()
        return {str(outcome): int(n) for outcome, n in rows}

    def history(self, path: str) -> list[Verdict]:
        with self._lock:
            rows = self._conn.execute(
                self._q(
                    "SELECT path, stat, outcome, severity, findings, moved_to, decided_at "
                    "FROM store_history WHERE path = ? ORDER BY decided_at"
                ),
                (path,),
            ).fetchall()
        out = []
        for p, stat, outcome, severity, findings, moved_to, at in rows:
            a, b, c, d, e = (int(x) for x in json.loads(stat))
            out.append(
                Verdict(p, (a, b, c, d, e), outcome, severity, json.loads(findings), moved_to, at)
            )
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteVerdicts(_SqlStore):
    def __init__(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        super().__init__(sqlite3.connect(path, check_same_thread=False))


class PostgresVerdicts(_SqlStore):
    mark = "%s"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise MissingExtraError("psycopg", "postgres", "A PostgreSQL verdict store") from None
        super().__init__(psycopg.connect(url))


def open_verdicts(where: str) -> VerdictStore:
    """``postgresql://...`` (or ``postgres://``) opens a shared store; anything else is a file."""
    if not where:
        raise UsageError("no verdict store given")
    if where.startswith(("postgresql://", "postgres://")):
        return PostgresVerdicts(where)
    return SqliteVerdicts(where.removeprefix("sqlite:///").removeprefix("sqlite://"))
