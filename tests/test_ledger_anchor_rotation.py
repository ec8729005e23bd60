"""The anchor file rotates itself and every run stays pinned, with bounded reads.

Before, the file grew one line per run until the read caps (TG1216 high past 64 MiB or
250,000 lines: nothing pinned any more), and moving it aside left old runs pinned only
with ``--anchors OLD``.  Now the writer that takes the file past ``ROTATE_BYTES`` files
its lines into 256 buckets by run id; a verify reads the current file and one bucket.

Generated (seed printed; ``TRAINGUARD_TEST_SEED`` replays): run ids (lengths, unicode),
signed or not, garbage lines between them, the rotation size, interrupted rotations,
concurrent writers.  ``ROTATE_BYTES`` is made small so that a test rotates many times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.seeds import seeded
from trainguard.ledger import anchorfile, anchorrotate
from trainguard.ledger.anchorfile import read_pin, write_anchor

LEDGER = "/data/run.db"


def _run_id(rnd: Any, n: int) -> str:
    tail = "".join(rnd.choice("abcxyz-_/é漢") for _ in range(rnd.randrange(0, 60)))
    return f"run-{n}-{tail}"


def _key(rnd: Any) -> str | None:
    return (
        None if rnd.random() < 0.2 else "".join(rnd.choice("0123456789abcdef") for _ in range(64))
    )


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file read_pin opens, in order."""
    opened: list[Path] = []
    real = anchorfile._read_file

    def spy(pin: Any, path: Path, *args: Any, **kwargs: Any) -> bool:
        opened.append(path)
        return real(pin, path, *args, **kwargs)

    monkeypatch.setattr(anchorfile, "_read_file", spy)
    return opened


def test_every_run_stays_pinned_across_rotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rnd = seeded()
    limit = rnd.randrange(1_000, 8_000)
    runs = rnd.randrange(60, 250)
    monkeypatch.setattr(anchorrotate, "ROTATE_BYTES", limit)
    print(f"{runs} runs, rotating at {limit} bytes")
    path = tmp_path / "anchors.jsonl"
    keys: dict[str, str | None] = {}
    garbage = 0
    for n in range(runs):
        run = _run_id(rnd, n)
        keys[run] = _key(rnd)
        write_anchor(path, run, LEDGER, keys[run])
        if rnd.random() < 0.05:  # a line that is no entry, as a torn or foreign write
            with open(path, "ab") as handle:
                handle.write(b"not an entry " + bytes([rnd.randrange(32, 127)]) + b"\n")
            garbage += 1
    folder = anchorrotate.archive_dir(path)
    assert folder.is_dir() and not anchorrotate.leftovers(path)
    current = path.read_bytes() if path.exists() else b""  # gone right after a rotation
    assert len(current) < limit  # rotated whenever it reached the size
    opened = _reads(monkeypatch)
    for run, key in keys.items():
        opened.clear()
        pin = read_pin(path, run, LEDGER)
        assert [e.key_id for e in pin.entries] == [key], run
        assert pin.unsigned == (key is None)
        # Bounded: the current file and the one bucket the run id names, nothing else.
        assert opened == [path, anchorrotate.bucket_path(path, run)]
        assert pin.findings == [] or pin.findings[0].rule == "TG1216"
    # Nothing lost: every line written is in the file or in the archive, once.
    archived = [p for p in folder.iterdir() if p.name != anchorrotate.MALFORMED]
    lines = current.splitlines() + [line for p in archived for line in p.read_bytes().splitlines()]
    assert sorted(json.loads(line)["run_id"] for line in lines if line.startswith(b"{")) == sorted(
        keys
    )
    malformed = folder / anchorrotate.MALFORMED
    kept = len(malformed.read_bytes().splitlines()) if malformed.exists() else 0
    assert kept + sum(not line.startswith(b"{") for line in lines) == garbage
    assert not any(n.startswith(anchorrotate.LEFTOVER_PREFIX) for n in os.listdir(folder))


def test_an_interrupted_rotation_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation killed after the rename (the file sits in the archive folder as
    ``rotating-*``, some buckets written): its runs still pin, and the next write files
    them; duplicates in a bucket pin the same key."""
    rnd = seeded()
    monkeypatch.setattr(anchorrotate, "ROTATE_BYTES", 1 << 30)  # no rotation by itself
    path = tmp_path / "anchors.jsonl"
    keys = {_run_id(rnd, n): _key(rnd) for n in range(rnd.randrange(5, 40))}
    for run, key in keys.items():
        write_anchor(path, run, LEDGER, key)
    folder = anchorrotate.archive_dir(path)
    folder.mkdir(mode=0o700)
    moved = folder / f"{anchorrotate.LEFTOVER_PREFIX}0001-1.jsonl"
    os.rename(path, moved)
    done = rnd.sample(sorted(keys), rnd.randrange(0, len(keys)))  # filed before the crash
    for run in done:
        with open(anchorrotate.bucket_path(path, run), "ab") as handle:
            line = next(
                x for x in moved.read_bytes().splitlines() if json.loads(x)["run_id"] == run
            )
            handle.write(line + b"\n")
        anchorrotate.bucket_path(path, run).chmod(0o600)
    print(f"{len(keys)} runs, {len(done)} filed before the crash")
    for run, key in keys.items():
        assert [e.key_id for e in read_pin(path, run, LEDGER).entries][:1] == [key]
    write_anchor(path, "later", LEDGER, None)  # the next watch start files the leftover
    assert not anchorrotate.leftovers(path)
    for run, key in keys.items():
        pin = read_pin(path, run, LEDGER)
        assert {e.key_id for e in pin.entries} == {key} and pin.findings == []


@pytest.mark.parametrize("problem", ["folder-mode", "bucket-mode", "leftovers"])
def test_an_archive_that_cannot_be_trusted_pins_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    """An archive folder or bucket others may write, or more interrupted rotations than
    a verify reads: TG1216 high, nothing pinned (an entry there could have been planted)."""
    monkeypatch.setattr(anchorrotate, "ROTATE_BYTES", 1)  # every write rotates
    path = tmp_path / "anchors.jsonl"
    write_anchor(path, "r", LEDGER, "ab" * 32)
    assert read_pin(path, "r", LEDGER).key_ids == ["ab" * 32]
    folder = anchorrotate.archive_dir(path)
    if problem == "folder-mode":
        folder.chmod(0o777)
    elif problem == "bucket-mode":
        anchorrotate.bucket_path(path, "r").chmod(0o666)
    else:
        for n in range(anchorrotate.MAX_LEFTOVERS + 1):
            (folder / f"{anchorrotate.LEFTOVER_PREFIX}{n}.jsonl").write_bytes(b"")
    pin = read_pin(path, "r", LEDGER)
    assert pin.key_ids is None
    assert [(f.rule, str(f.severity)) for f in pin.findings] == [("TG1216", "high")]


WRITER = """
import sys
from pathlib import Path
from trainguard.ledger import anchorrotate
from trainguard.ledger.anchorfile import write_anchor
anchorrotate.ROTATE_BYTES = int(sys.argv[4])
for n in range(int(sys.argv[3])):
    write_anchor(Path(sys.argv[1]), f"{sys.argv[2]}-{n}", "/l.db", "ab" * 32)
"""


def test_concurrent_writers_rotating_lose_no_run(tmp_path: Path) -> None:
    """Writers in several processes, rotations among them: every run is pinned after."""
    rnd = seeded()
    writers, each, limit = rnd.randrange(2, 5), rnd.randrange(40, 120), rnd.randrange(2_000, 6_000)
    print(f"{writers} writers x {each} runs, rotating at {limit} bytes")
    path = tmp_path / "anchors.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", str(each), str(limit)])
        for w in range(writers)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * writers
    for w in range(writers):
        for n in range(each):
            pin = read_pin(path, f"w{w}-{n}", "/l.db")
            assert pin.key_ids == ["ab" * 32] and pin.findings == [], (w, n, pin.findings)
