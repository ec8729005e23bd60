"""Both stores, SQLite and PostgreSQL: appends, reads, concurrency and crashes.

Every test runs against both backends.  Processes are real: several appending
at once to one ledger, and one killed with SIGKILL in the middle of its
appends, after which the ledger must verify up to its last complete record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.test_ledger_support import (
    BACKENDS,
    backend_url,
    is_postgres,
    raw_rows,
    tamper,
    unsigned_only,
)
from trainguard.ledger import GENESIS, LedgerError, Record, open_ledger, verify_ledger
from trainguard.ledger import store as store_module
from trainguard.signing.keys import write_keypair


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as u:
        yield u


def _child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_append_and_read_back(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        first = ledger.append("run-a", "run-start", {"world_size": 2})
        steps = [
            ledger.append("run-a", "step", {"loss": 1.5 - i, "i": (i, i)}, step=i, stream=0)
            for i in range(3)
        ]
        other = ledger.append("run-b", "step", {}, step=0, stream=5)
        assert (first.stream, first.seq, first.prev) == (-1, 0, GENESIS)
        assert [s.seq for s in steps] == [0, 1, 2]
        assert steps[1].prev == steps[0].digest and steps[0].prev == GENESIS
        assert steps[2].payload == {"loss": -0.5, "i": [2, 2]}
        got = list(ledger.records("run-a"))
        assert got == [first, *steps]
        assert list(ledger.records("run-a", stream=0)) == steps
        assert list(ledger.records("run-a", stream=7)) == []
        assert ledger.runs() == ["run-a", "run-b"]
        assert ledger.streams("run-a") == [-1, 0]
        assert other.seq == 0
        assert unsigned_only(verify_ledger(ledger, "run-a"))


def test_reading_pages_through_large_runs(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PAGE_SIZE", 7)
    with closing(open_ledger(url)) as ledger:
        for stream in (-1, 0, 1):
            for i in range(10):
                ledger.append("r", "step", {"i": i}, step=i, stream=stream)
        records = list(ledger.records("r"))
        assert [(r.stream, r.seq) for r in records] == [
            (s, i) for s in (-1, 0, 1) for i in range(10)
        ]
        assert len(list(ledger.records("r", 1))) == 10


def test_the_tables_are_append_only(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        ledger.append("r", "step", {"loss": 1.0}, step=0, stream=0)
    if is_postgres(url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for sql in (
                "UPDATE trainguard_ledger_records SET payload = '{}'",
                "DELETE FROM trainguard_ledger_records",
                "TRUNCATE trainguard_ledger_records",
            ):
                with pytest.raises(psycopg.Error, match="append-only"):
                    conn.execute(sql)
    else:
        import sqlite3

        lite = sqlite3.connect(url)
        for sql in (
            "UPDATE trainguard_ledger_records SET payload = '{}'",
            "DELETE FROM trainguard_ledger_records",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                lite.execute(sql)
        lite.close()
    assert raw_rows(url, "r", 0)[0]["payload"] == '{"loss":1.0}'


def test_a_stale_head_is_re_read_not_forked(url: str) -> None:
    """Two ledger objects on one stream: each append lands after the other's."""
    one, two = open_ledger(url), open_ledger(url)
    try:
        for i in range(5):
            one.append("r", "step", {"by": 1}, step=i, stream=0)
            two.append("r", "step", {"by": 2}, step=i, stream=0)
        two.sign_head("r", 0, _key(url))
        one.append("r", "step", {"by": 1}, step=5, stream=0)
        assert [r.seq for r in one.records("r", 0)] == list(range(12))
        assert unsigned_only(verify_ledger(one, "r"))
    finally:
        one.close()
        two.close()


def _key(url: str) -> object:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def test_threads_share_one_ledger(url: str) -> None:
    with closing(open_ledger(url)) as ledger:

        def work(stream: int) -> None:
            for i in range(40):
                ledger.append("r", "step", {"i": i}, step=i, stream=stream % 2)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(list(ledger.records("r"))) == 160
        assert unsigned_only(verify_ledger(ledger, "r"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        ledger.append("r", "run-start", {})
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                ledger.append("r", "step", {"child": True}, step=0, stream=1)
                ledger.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        ledger.append("r", "step", {"parent": True}, step=0, stream=0)
        assert {r.stream for r in ledger.records("r")} == {-1, 0, 1}
        assert unsigned_only(verify_ledger(ledger, "r"))


APPENDER = """
    import sys
    from trainguard.ledger import open_ledger
    url, run, stream, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ledger = open_ledger(url)
    for i in range(count):
        ledger.append(run, "step", {"loss": 1.0 / (i + 1), "rank": stream}, step=i, stream=stream)
    ledger.close()
"""


def test_ranks_append_concurrently_from_several_processes(url: str) -> None:
    # Ranks 0-2 each own a stream; two more processes race on stream 3.
    jobs = [(0, 150), (1, 150), (2, 150), (3, 100), (3, 100)]
    children = [_child(APPENDER, url, "multi", str(s), str(n)) for s, n in jobs]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
    with closing(open_ledger(url)) as ledger:
        counts = {s: len(list(ledger.records("multi", s))) for s in range(4)}
        assert counts == {0: 150, 1: 150, 2: 150, 3: 200}
        assert ledger.streams("multi") == [0, 1, 2, 3]
        assert unsigned_only(verify_ledger(ledger, "multi"))


KILLED_APPENDER = """
    import sys
    from trainguard.ledger import open_ledger
    url = sys.argv[1]
    ledger = open_ledger(url)
    blob = "x" * 200_000  # large records: a kill is likely to land mid-write
    i = 0
    while True:
        ledger.append("killed", "step", {"blob": blob, "i": i}, step=i, stream=0)
        if i == 20:
            print("ready", flush=True)
        i += 1
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13])
def test_sigkill_mid_append_leaves_a_ledger_that_verifies(url: str, delay: float) -> None:
    child = _child(KILLED_APPENDER, url)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    child.stdout.close()
    if child.stderr is not None:
        child.stderr.close()
    with closing(open_ledger(url)) as ledger:
        records = list(ledger.records("killed"))
        assert len(records) > 20
        assert [r.seq for r in records] == list(range(len(records)))
        assert unsigned_only(verify_ledger(ledger, "killed"))
        # The ledger stays usable: the next append chains onto the last record.
        after = ledger.append("killed", "rank-exit", {"signal": 9}, stream=0)
        assert (after.seq, after.prev) == (len(records), records[-1].digest)
        assert unsigned_only(verify_ledger(ledger, "killed"))


def test_sign_head_of_an_empty_stream_is_an_error(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        with pytest.raises(LedgerError, match="no record to sign"):
            ledger.sign_head("nothing", 0, _key(url))


def test_sign_head_takes_a_pem_path(url: str, tmp_path: Path) -> None:
    private, public = write_keypair(tmp_path / "k")
    with closing(open_ledger(url)) as ledger:
        signed = ledger.append("r", "step", {}, step=0, stream=2)
        head: Record = ledger.sign_head("r", 2, str(private))
        assert (head.kind, head.seq, head.prev) == ("head", 1, signed.digest)
        assert set(head.payload) == {"envelope", "key_id"}
        assert verify_ledger(ledger, "r", str(public)) == []


def test_a_closed_ledger_refuses_work(url: str) -> None:
    ledger = open_ledger(url)
    ledger.append("r", "x", {})
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.append("r", "x", {})


def test_tamper_helper_really_bypasses_the_triggers(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        ledger.append("r", "x", {"a": 1}, stream=0)
    tamper(url, ("UPDATE trainguard_ledger_records SET payload = ?", ('{"a":2}',)))
    assert raw_rows(url, "r", 0)[0]["payload"] == '{"a":2}'
