"""The store guard on a real folder: concurrent writers, slow writers, swaps, restarts.

Malicious files here are pickles built opcode by opcode (``tests.helpers``);
nothing is ever loaded, the guard only scans and moves them.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import call1
from trainguard.findings import FileResult
from trainguard.scanner.engine import scan_file
from trainguard.store import StoreGuard, StoreOptions, open_verdicts
from trainguard.store.metrics import serve

MALICIOUS = call1("os", "system", "touch /nonexistent/canary")
CLEAN = pickle.dumps({"step": 7, "lr": 0.001, "names": ["a", "b"]}, protocol=4)


def _options(root: Path, q: Path, **kw: float) -> StoreOptions:
    return StoreOptions(
        str(root), str(q), settle=kw.get("settle", 0.3), interval=kw.get("interval", 0.05)
    )


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial-write")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Counting:
    """scan_file, counting how often each path is scanned."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, path: str) -> FileResult:
        with self.lock:
            self.calls[path] = self.calls.get(path, 0) + 1
        return scan_file(path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    root, q = tmp_path / "store", tmp_path / "quarantine"
    root.mkdir()
    yield root, q, str(tmp_path / "verdicts.sqlite")


def _running(guard: StoreGuard) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=guard.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_malicious_file_written_after_start_is_quarantined_and_a_clean_one_stays(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    guard = StoreGuard(_options(root, q), open_verdicts(db))
    stop, thread = _running(guard)
    try:
        _write(root / "team-a" / "ckpt-100.pt", MALICIOUS)
        _write(root / "team-a" / "ckpt-99.pt", CLEAN)
        moved = q / "team-a" / "ckpt-100.pt"
        assert _wait_for(moved.exists), "not quarantined within 10 s"
        assert _wait_for(lambda: guard.verdicts.known("team-a/ckpt-99.pt") is not None)
    finally:
        stop.set()
        thread.join()
    assert not (root / "team-a" / "ckpt-100.pt").exists()
    assert moved.read_bytes() == MALICIOUS  # moved, never deleted or changed
    assert (root / "team-a" / "ckpt-99.pt").read_bytes() == CLEAN
    note = json.loads((q / "team-a" / "ckpt-100.pt.trainguard.json").read_text())
    assert any(w["severity"] == "critical" for w in note["why"])
    (bad,) = guard.verdicts.history("team-a/ckpt-100.pt")
    assert bad.outcome == "quarantined" and bad.moved_to == str(moved)
    (good,) = guard.verdicts.history("team-a/ckpt-99.pt")
    assert good.outcome == "clean"
    assert guard.verdicts.counts() == {"clean": 1, "quarantined": 1}


def test_a_restart_rescans_nothing_unchanged_and_a_changed_file_once(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    for i in range(20):
        _write(root / f"f{i}.pkl", CLEAN)
    first = Counting()
    StoreGuard(_options(root, q, settle=0), open_verdicts(db), first).once()
    assert len(first.calls) == 20
    again = Counting()
    restarted = StoreGuard(_options(root, q, settle=0), open_verdicts(db), again)
    assert restarted.once() == [] and again.calls == {}
    _write(root / "f3.pkl", MALICIOUS)  # replaced by a new file: a new inode
    (verdict,) = restarted.once()
    assert verdict.path == "f3.pkl" and verdict.outcome == "quarantined"
    assert again.calls == {str(root / "f3.pkl"): 1}


def test_a_burst_of_1000_files_from_concurrent_writers_is_decided_once_each(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    seed = random.randrange(2**32)
    print(f"burst seed {seed}")
    rng = random.Random(seed)
    bad = {f"w{w}/f{i}.pkl" for w in range(4) for i in rng.sample(range(250), 3)}
    scans = Counting()
    guard = StoreGuard(_options(root, q, settle=0.2), open_verdicts(db), scans)
    stop, thread = _running(guard)

    def writer(w: int) -> None:
        for i in range(250):
            name = f"w{w}/f{i}.pkl"
            _write(root / name, MALICIOUS if name in bad else CLEAN)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    try:
        assert _wait_for(lambda: sum(guard.verdicts.counts().values()) == 1000, timeout=60)
    finally:
        stop.set()
        thread.join()
    assert guard.verdicts.counts() == {"clean": 1000 - len(bad), "quarantined": len(bad)}
    assert {p.relative_to(q).as_posix() for p in q.rglob("*.pkl")} == bad
    assert max(scans.calls.values()) == 1  # nothing scanned twice: writes were atomic


def test_a_slow_writer_is_scanned_once_when_done_even_with_pauses_longer_than_settle(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    scans = Counting()
    guard = StoreGuard(_options(root, q, settle=0.2), open_verdicts(db), scans)
    stop, thread = _running(guard)
    target = root / "slow.pt"
    try:
        with open(target, "wb") as f:  # held open for writing the whole time
            for i in range(0, len(MALICIOUS), 8):
                f.write(MALICIOUS[i : i + 8])
                f.flush()
                time.sleep(0.3)  # longer than settle: only the open descriptor says "busy"
            assert scans.calls == {}
        assert _wait_for((q / "slow.pt").exists)
    finally:
        stop.set()
        thread.join()
    assert scans.calls == {str(target): 1}
    (verdict,) = guard.verdicts.history("slow.pt")
    assert verdict.severity == "critical"  # the whole payload, not a truncated stream


def test_a_file_replaced_while_being_scanned_gets_no_verdict_for_the_old_bytes(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    target = root / "model.pt"
    _write(target, CLEAN)
    swapped = threading.Event()

    def swap_during_scan(path: str) -> FileResult:
        result = scan_file(path)  # reads the clean bytes
        if not swapped.is_set():
            swapped.set()
            _write(target, MALICIOUS)  # the swap lands before the verdict
        return result

    guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db), swap_during_scan)
    verdicts = guard.once()
    assert [v.outcome for v in verdicts] == ["quarantined"]
    assert [v.outcome for v in guard.verdicts.history("model.pt")] == ["quarantined"]
    assert (q / "model.pt").read_bytes() == MALICIOUS
    assert guard.metrics.rescans == 1


def test_a_scan_error_fails_closed(store: tuple[Path, Path, str]) -> None:
    root, q, db = store
    _write(root / "x.pt", CLEAN)

    def broken(path: str) -> FileResult:
        return FileResult(path, "unknown", 0, error="cannot read: I/O error")

    (verdict,) = StoreGuard(_options(root, q, settle=0), open_verdicts(db), broken).once()
    assert verdict.outcome == "quarantined" and (q / "x.pt").exists()


def test_the_quarantine_inside_the_store_is_never_rescanned(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _write(root / "a.pt", MALICIOUS)
    guard = StoreGuard(
        _options(root, root / ".quarantine", settle=0), open_verdicts(str(tmp_path / "v.db"))
    )
    assert len(guard.once()) == 1
    assert guard.once() == []
    assert (root / ".quarantine" / "a.pt").exists()


def test_metrics_endpoint(store: tuple[Path, Path, str]) -> None:
    root, q, db = store
    _write(root / "a.pt", MALICIOUS)
    _write(root / "b.pt", CLEAN)
    guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db))
    guard.once()
    server = serve(guard.metrics, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:  # noqa: S310
            text = r.read().decode()
        with urllib.request.urlopen(base + "/status", timeout=5) as r:  # noqa: S310
            status = json.loads(r.read())
    finally:
        server.shutdown()
        server.server_close()
    assert 'trainguard_store_verdicts_total{outcome="quarantined"} 1' in text
    assert "trainguard_store_scans_total 2" in text
    assert status["outcomes"] == {"clean": 1, "quarantined": 1}


def test_cli_once_exits_1_when_something_was_quarantined(
    store: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    root, q, db = store
    _write(root / "a.pt", MALICIOUS)
    _write(root / "b.pt", CLEAN)
    argv = ["store", "watch", str(root), "--quarantine", str(q), "--ledger", db, "--once"]
    assert main([*argv, "--settle", "0"]) == 1
    assert "quarantined a.pt" in capsys.readouterr().out
    assert main([*argv, "--settle", "0"]) == 0  # restarted: nothing new, nothing rescanned
    assert (root / "b.pt").exists() and (q / "a.pt").exists()


def test_the_service_as_users_run_it(store: tuple[Path, Path, str], tmp_path: Path) -> None:
    """`trainguard store watch` in its own process: a file written after start is moved."""
    import subprocess
    import sys

    root, q, db = store
    argv = ["store", "watch", str(root), "--quarantine", str(q), "--ledger", db]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainguard", *argv, "--settle", "0.5", "--interval", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "guarding" in proc.stderr.readline()  # started: files written now are new
        _write(root / "late" / "ckpt.pt", MALICIOUS)
        _write(root / "late" / "ok.pt", CLEAN)
        assert _wait_for((q / "late" / "ckpt.pt").exists, timeout=10)
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert code == 0
    assert (root / "late" / "ok.pt").exists()
    verdicts = open_verdicts(db)
    assert verdicts.counts() == {"clean": 1, "quarantined": 1}
    verdicts.close()
