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

from tests.test_ledger_support import POSTGRES_ENV, postgres_base_url, postgres_schema
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
        assert verify_ledger(ledger, "r") == []


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
        assert verify_ledger(ledger, "r") == []


def test_no_server_is_an_error_that_hides_the_password(tmp_path: Path) -> None:
    ledger = open_ledger("postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2")
    with pytest.raises(LedgerError) as info:
        ledger.runs()
    assert "hunter2" not in str(info.value)
    assert "u:***@127.0.0.1:1" in str(info.value)


def test_reading_without_create_refuses_an_empty_database(url: str) -> None:
    with pytest.raises(LedgerError, match="not a trainguard ledger"):
        open_ledger(url, create=False).runs()
