"""Helpers for the ledger tests (no tests here): backends, raw SQL tampering, attackers.

PostgreSQL tests run against the server named by ``TRAINGUARD_TEST_POSTGRES_URL``
(``scripts/start-test-postgres.sh`` starts one; ``.ci/run`` does so).  Without
it they are skipped, except under ``CI=true``, where they fail: CI must never
pass by skipping them.  Each test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from trainguard.ledger.chain import GENESIS, record_digest

POSTGRES_ENV = "TRAINGUARD_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgres")
Row = dict[str, Any]
_COLUMNS = ("run_id", "stream", "seq", "kind", "step", "wall_time", "payload", "prev", "digest")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"PostgreSQL tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(reason)


def postgres_base_url() -> str:
    """The test server's URL; skips (or, in CI, fails) when there is none."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if not url:
        _unavailable(
            f"{POSTGRES_ENV} is not set (start a server with scripts/start-test-postgres.sh "
            "and export the URL it prints)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'trainguard[postgres]')")
    return url


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL whose connections use a fresh schema of the test server."""
    import psycopg

    base = postgres_base_url()
    schema = f"tg_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def backend_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp_path / "ledger.db")
    else:
        with postgres_schema() as url:
            yield url


# -- what an attacker with write access to the database does -------------------
def tamper(url: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Run SQL (``?`` placeholders) on the records, with the append-only triggers off."""
    if is_postgres(url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            conn.execute("ALTER TABLE trainguard_ledger_records DISABLE TRIGGER USER")
            for sql, params in statements:
                conn.execute(sql.replace("?", "%s"), params)
        return
    lite = sqlite3.connect(url, isolation_level=None)
    try:
        lite.execute("DROP TRIGGER IF EXISTS trainguard_ledger_no_update")
        lite.execute("DROP TRIGGER IF EXISTS trainguard_ledger_no_delete")
        lite.execute("BEGIN")
        for sql, params in statements:
            lite.execute(sql, params)
        lite.execute("COMMIT")
    finally:
        lite.close()


def raw_rows(url: str, run_id: str, stream: int) -> list[Row]:
    sql = (
        "SELECT run_id, stream, seq, kind, step, wall_time, payload, prev, digest "
        "FROM trainguard_ledger_records WHERE run_id = ? AND stream = ? ORDER BY seq"
    )
    if is_postgres(url):
        import psycopg

        with psycopg.connect(url) as conn:
            rows = conn.execute(sql.replace("?", "%s"), (run_id, stream)).fetchall()
    else:
        lite = sqlite3.connect(url)
        try:
            rows = lite.execute(sql, (run_id, stream)).fetchall()
        finally:
            lite.close()
    return [dict(zip(_COLUMNS, row, strict=True)) for row in rows]


def rehash(rows: list[Row]) -> list[Row]:
    """Renumber and re-chain rows the way a writer would have: a consistent forgery."""
    prev = GENESIS
    out = []
    for seq, row in enumerate(rows):
        row = {**row, "seq": seq, "prev": prev}
        row["digest"] = record_digest(
            row["run_id"],
            row["stream"],
            seq,
            row["kind"],
            row["step"],
            row["wall_time"],
            row["payload"],
            prev,
        )
        prev = row["digest"]
        out.append(row)
    return out


def rewrite_stream(
    url: str, run_id: str, stream: int, change: Callable[[list[Row]], list[Row]]
) -> None:
    """Replace a whole stream by ``change(rows)``, re-hashed so every link holds."""
    rows = rehash(change(raw_rows(url, run_id, stream)))
    insert = (
        "INSERT INTO trainguard_ledger_records "
        "(run_id, stream, seq, kind, step, wall_time, payload, prev, digest) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    statements: list[tuple[str, tuple[Any, ...]]] = [
        (
            "DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = ?",
            (run_id, stream),
        )
    ]
    statements += [(insert, tuple(row[c] for c in _COLUMNS)) for row in rows]
    tamper(url, *statements)


def unsigned_only(findings: list[Any]) -> bool:
    """An intact chain of a run without run keys: only the medium "unsigned" note (TG1210)."""
    return [(f.rule, int(f.severity)) for f in findings] == [("TG1210", 2)]
