"""What only the PostgreSQL ledger does: URLs, sessions, set-up races, lost connections.

The behaviour both stores share is tested in test_ledger_stores.py and
test_ledger_verify.py, against a real server for PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.test_ledger_support import (
    POSTGRES_ENV,
    postgres_base_url,
    postgres_schema,
    unsigned_only,
)
from trainguard.ledger import LedgerError, open_ledger, verify_ledger
from trainguard.ledger.postgres_store import PostgresLedger, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql://u:secret@db/x?password=also&sslmode=require", "postgresql://u:***@db/x"),
        ("postgresql://db/x?password=secret", "postgresql://db/x"),
        ("postgres://u@db/x", "postgres://u@db/x"),
    ],
)
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_missing_server_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        postgres_base_url()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=POSTGRES_ENV):
        postgres_base_url()


@pytest.fixture()
def url() -> Iterator[str]:
    with postgres_schema() as u:
        yield u


def test_appends_skip_the_flush_unless_the_url_asks(url: str) -> None:
    ledger = PostgresLedger(url)
    with closing(ledger):
        ledger.append("r", "x", {})
        assert ledger._query("SHOW synchronous_commit", ()) == [("off",)]
    durable = PostgresLedger(url + "%20-csynchronous_commit%3Don")
    with closing(durable):
        durable.append("r", "x", {})
        assert durable._query("SHOW synchronous_commit", ()) == [("on",)]
        assert [r.seq for r in durable.records("r")] == [0, 1]


SETUP = """
    import sys
    from trainguard.ledger import open_ledger
    ledger = open_ledger(sys.argv[1])
    ledger.append("r", "rank-start", {}, stream=int(sys.argv[2]))
    ledger.close()
"""


def test_many_ranks_creating_the_tables_at_once(url: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(SETUP), url, str(rank)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(6)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    with closing(open_ledger(url)) as ledger:
        assert ledger.streams("r") == list(range(6))  # type: ignore[attr-defined]
        assert unsigned_only(verify_ledger(ledger, "r"))


def test_a_lost_connection_is_buffered_then_reopened(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from trainguard.ledger import outage

    monkeypatch.setattr(outage, "RETRY_SECONDS", 0.0)
    ledger = PostgresLedger(url)
    with closing(ledger):
        first = ledger.append("r", "step", {"i": 0}, step=0, stream=0)
        (pid,) = ledger._query("SELECT pg_backend_pid()", ())[0]
        with psycopg.connect(postgres_base_url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The append that met the broken connection waits in the queue (outage.py) ...
        assert ledger.append("r", "step", {"i": 1}, step=1, stream=0).seq == -1
        password = urlsplit(url).password
        assert password and password not in ledger.location
        # ... and the next one, on a new connection, writes it first.
        ledger.append("r", "step", {"i": 2}, step=2, stream=0)
        records = list(ledger.records("r"))
        assert [r.payload.get("i") for r in records] == [0, 1, None, 2]  # None: ledger-outage
        assert records[1].prev == first.digest
        assert unsigned_only(verify_ledger(ledger, "r"))


def test_no_server_is_an_error_that_hides_the_password(tmp_path: Path) -> None:
    ledger = open_ledger("postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2")
    with pytest.raises(LedgerError) as info:
        ledger.runs()
    assert "hunter2" not in str(info.value)
    assert "u:***@127.0.0.1:1" in str(info.value)


def test_reading_without_create_refuses_an_empty_database(url: str) -> None:
    with pytest.raises(LedgerError, match="not a trainguard ledger"):
        open_ledger(url, create=False).runs()


# -- the server's own time on every record --------------------------------------------------
def _server_now(ledger: PostgresLedger) -> float:
    return float(
        ledger._locked_query("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8", ())[0][0]
    )


def test_server_time_is_the_servers_own(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A faked client clock changes the record's time, not the server's; an INSERT that
    names the column gets the server's time anyway; the digest does not cover it."""
    ledger = PostgresLedger(url)
    with closing(ledger):
        before = _server_now(ledger)
        monkeypatch.setattr(ledger, "_record_time", lambda: 1.0)  # a client that backdates
        written = [ledger.append("r", "step", {"i": i}, step=i, stream=0) for i in range(3)]
        monkeypatch.undo()
        ledger._connection().execute(
            "INSERT INTO trainguard_ledger_records (run_id, stream, seq, kind, step, "
            "wall_time, payload, prev, digest, server_time) VALUES "
            "('forged', 0, 0, 'k', NULL, 1.0, '{}', %s, %s, '2000-01-01')",
            ("0" * 64, "0" * 64),
        )
        after = _server_now(ledger)
        read = list(ledger.records("r"))
        assert read == written and all(r.time == 1.0 for r in read)
        stamps = [r.server_time for r in read]
        assert all(s is not None and before <= s <= after for s in stamps), (before, stamps)
        assert stamps == sorted(stamps)  # type: ignore[type-var]
        (forged,) = ledger.records("forged")
        assert forged.server_time is not None and before <= forged.server_time <= after
        assert unsigned_only(verify_ledger(ledger, "r"))


def test_sqlite_records_have_no_server_time(tmp_path: Path) -> None:
    with closing(open_ledger(str(tmp_path / "l.db"))) as ledger:
        ledger.append("r", "x", {})
        assert [r.server_time for r in ledger.records("r")] == [None]


def test_older_tables_get_the_column_from_a_role_that_may_add_it(url: str) -> None:
    """A table made before the column: a training role with INSERT and SELECT only writes
    on without server times (and cannot set or change them); the owner's next connection
    adds the column; rows written before keep None, never the migration's time."""
    import uuid

    import psycopg

    with closing(PostgresLedger(url)) as ledger:
        ledger.append("r", "x", {"i": 0}, stream=0)
        conn = ledger._connection()
        conn.execute("DROP TRIGGER trainguard_ledger_server_time ON trainguard_ledger_records")
        conn.execute("ALTER TABLE trainguard_ledger_records DROP COLUMN server_time")
        schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
    role, secret = f"tg_ins_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    parts = urlsplit(url)
    limited = url.replace(f"{parts.username}:{parts.password}@", f"{role}:{secret}@", 1)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
        try:
            admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            admin.execute(
                f"GRANT SELECT, INSERT ON trainguard_ledger_records, "
                f"trainguard_ledger_streams TO {role}"
            )
            with closing(PostgresLedger(limited)) as trainer:
                trainer.append("r", "x", {"i": 1}, stream=0)
                assert [r.server_time for r in trainer.records("r")] == [None, None]
            with closing(PostgresLedger(url)) as owner:
                owner.append("r", "x", {"i": 2}, stream=0)
                stamps = [r.server_time for r in owner.records("r")]
                assert stamps[:2] == [None, None] and stamps[2] is not None
                assert unsigned_only(verify_ledger(owner, "r"))
            with closing(PostgresLedger(limited)) as trainer:
                trainer.append("r", "x", {"i": 3}, stream=0)
                assert next(iter(trainer.records("r", 0, after_seq=2))).server_time is not None
                with pytest.raises(psycopg.Error):
                    trainer._connection().execute(
                        "UPDATE trainguard_ledger_records SET server_time = now()"
                    )
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
