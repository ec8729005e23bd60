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


def test_a_slow_honest_writer_gets_one_verdict_when_done_even_with_long_pauses(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    guard = StoreGuard(_options(root, q, settle=0.2), open_verdicts(db))
    stop, thread = _running(guard)
    target = root / "slow.pt"
    try:
        with open(target, "wb") as f:  # held open for writing the whole time
            for i in range(0, len(CLEAN), 8):
                f.write(CLEAN[i : i + 8])
                f.flush()
                time.sleep(0.3)  # longer than settle: only the open descriptor says "busy"
                assert guard.verdicts.known("slow.pt") is None  # half a file: no verdict
        assert _wait_for(lambda: guard.verdicts.known("slow.pt") is not None)
    finally:
        stop.set()
        thread.join()
    (verdict,) = guard.verdicts.history("slow.pt")
    assert verdict.outcome == "clean" and target.read_bytes() == CLEAN


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


# -- what a red team got past the first version (families, generated) ----------------------


def test_files_behind_folder_links_are_guarded_and_link_loops_end(
    store: tuple[Path, Path, str], tmp_path: Path
) -> None:
    root, q, db = store
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere / "deep" / "evil.pkl", MALICIOUS)
    os.symlink(elsewhere, root / "sub")  # a loader opens root/sub/deep/evil.pkl just fine
    os.symlink("..", elsewhere / "deep" / "up")  # and a loop back up
    verdicts = StoreGuard(_options(root, q, settle=0), open_verdicts(db)).once()
    assert [(v.path, v.outcome) for v in verdicts] == [("sub/deep/evil.pkl", "quarantined")]
    assert not (elsewhere / "deep" / "evil.pkl").exists()


def test_a_payload_held_open_for_writing_is_quarantined_without_waiting(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    target = root / "held.pkl"
    target.write_bytes(MALICIOUS)
    fd = os.open(target, os.O_RDWR)  # an idle "writer" that never closes
    try:
        guard = StoreGuard(_options(root, q, settle=0.1), open_verdicts(db))
        stop, thread = _running(guard)
        try:
            assert _wait_for((q / "held.pkl").exists, timeout=10)
        finally:
            stop.set()
            thread.join()
    finally:
        os.close(fd)


def test_an_honest_file_being_written_is_not_judged_on_its_half(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    target = root / "big.pkl"
    with open(target, "wb") as f:
        f.write(CLEAN[: len(CLEAN) // 2])  # a truncated pickle: unreadable, not a payload
        f.flush()
        guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db))
        assert guard.once(max_wait=0.5) == []  # provisional: nothing decided yet
        f.write(CLEAN[len(CLEAN) // 2 :])
    (verdict,) = guard.once()
    assert verdict.outcome == "clean" and target.exists()


def test_names_in_the_way_of_the_quarantine_layout_never_stop_the_guard(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    seed = random.randrange(2**32)
    print(f"collision seed {seed}")
    rng = random.Random(seed)
    guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db))
    expected_bad = 0
    for _ in range(rng.randrange(3, 7)):
        # A quarantined file's name reused as a folder (a -> a/x) or the reverse.
        name = rng.choice(["a", "a/b", "c"])
        path = root / name
        if path.is_dir():
            path = path / "again.pkl"
        elif path.exists():
            path.unlink()
        _write(path, MALICIOUS)
        expected_bad += 1
        guard.once()
        assert not path.exists()
    assert (
        guard.verdicts.counts() == {"quarantined": expected_bad}
        or sum(guard.verdicts.counts().values()) <= expected_bad
    )
    moved = [p for p in q.rglob("*") if p.is_file() and not p.name.endswith(".json")]
    moved = [p for p in moved if p.name != "verdicts.sqlite"]
    assert len(moved) == expected_bad and all(p.read_bytes() == MALICIOUS for p in moved)


def test_names_that_are_not_utf8_are_judged_and_recorded(store: tuple[Path, Path, str]) -> None:
    root, q, db = store
    rng = random.Random()
    names = {bytes(rng.sample(range(0x80, 0x100), 3)) + b".pkl" for _ in range(5)}
    for raw in names:
        with open(os.path.join(os.fsencode(root), raw), "wb") as f:
            f.write(MALICIOUS if raw[0] % 2 else CLEAN)
    guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db))
    verdicts = guard.once()
    assert len(verdicts) == len(names) and guard.errors == []
    assert all(v.path.isprintable() for v in verdicts)
    assert StoreGuard(_options(root, q, settle=0), open_verdicts(db)).once() == []  # restart


def test_one_file_that_cannot_be_judged_does_not_stop_the_others(
    store: tuple[Path, Path, str],
) -> None:
    root, q, db = store
    _write(root / "a.pkl", CLEAN)
    _write(root / "b.pkl", MALICIOUS)

    def flaky(path: str) -> FileResult:
        if path.endswith("a.pkl"):
            raise RuntimeError("disk hiccup")
        return scan_file(path)

    guard = StoreGuard(_options(root, q, settle=0), open_verdicts(db), flaky)
    verdicts = guard.once(max_wait=0.3)
    assert [v.path for v in verdicts] == ["b.pkl"]
    assert guard.errors and "a.pkl" in guard.errors[0] and guard.metrics.errors >= 1
