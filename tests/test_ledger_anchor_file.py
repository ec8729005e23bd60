"""The anchor file itself: garbage, caps, other owners, concurrent writers, off.

Whatever is in the file, reading it never raises: a file that cannot be used is a
TG1216 finding (high), lines that are no entry are one medium finding, and the good
lines still pin.  Lines are generated (seed printed; ``TRAINGUARD_TEST_SEED`` replays).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.seeds import seeded
from trainguard.ledger import anchorfile
from trainguard.ledger.anchorfile import default_path, read_pin, write_anchor

KEY = "ab" * 32
LEDGER = "/data/run.db"


def garbage(rng: random.Random) -> bytes:
    good = {"v": 1, "run_id": "r", "ledger": LEDGER, "key_id": KEY, "signed": True, "time": "t"}
    kinds = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
        lambda: b"[" * (depth := rng.randrange(1, 2000)) + b"]" * depth,  # deep nesting
        lambda: json.dumps({**good, "signed": "yes"}).encode(),
        lambda: json.dumps({**good, "key_id": "xyz"}).encode(),
        lambda: json.dumps({**good, "v": 2}).encode(),
        lambda: json.dumps({**good, "signed": False}).encode(),  # unsigned with a key
        lambda: json.dumps([good]).encode(),
        lambda: b"x" * (anchorfile.MAX_LINE_BYTES + 10),
    ]
    return rng.choice(kinds)().replace(b"\n", b" ")


def test_garbage_lines_are_a_medium_finding_and_good_lines_still_pin(tmp_path: Path) -> None:
    rng = seeded()
    path = tmp_path / "anchors.jsonl"
    write_anchor(path, "r", LEDGER, KEY)
    bad = rng.randint(1, 30)
    with open(path, "ab") as handle:
        for _ in range(bad):
            handle.write(garbage(rng) + b"\n")
        handle.write(b'{"v": 1, "run_id": "r", "torn')  # a last line cut short
    write_anchor(tmp_path / "other.jsonl", "r", LEDGER, KEY)
    pin = read_pin(path, "r", LEDGER)
    assert pin.key_ids == [KEY]
    assert [(f.rule, str(f.severity)) for f in pin.findings] == [("TG1216", "medium")]
    assert f"holds {bad + 1} line(s)" in pin.findings[0].message


@pytest.mark.parametrize("problem", ["size", "lines", "mode", "directory"])
def test_an_unusable_file_is_high_and_pins_nothing(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "anchors.jsonl"
    for _ in range(3):
        write_anchor(path, "r", LEDGER, KEY)
    if problem == "size":
        monkeypatch.setattr(anchorfile, "MAX_ANCHOR_BYTES", path.stat().st_size - 1)
    elif problem == "lines":
        monkeypatch.setattr(anchorfile, "MAX_ANCHOR_LINES", 2)
    elif problem == "mode":
        path.chmod(0o622)  # anyone may append a line of their own
    else:
        path.unlink()
        path.mkdir()
    pin = read_pin(path, "r", LEDGER)
    assert pin.key_ids is None
    assert [(f.rule, str(f.severity)) for f in pin.findings] == [("TG1216", "high")]


def test_a_missing_file_is_no_finding(tmp_path: Path) -> None:
    pin = read_pin(tmp_path / "none.jsonl", "r", LEDGER)
    assert (pin.key_ids, pin.findings) == (None, [])
    assert "no entry for this run" in pin.note()


def test_entries_match_run_and_ledger_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "anchors.jsonl"
    ledger = tmp_path / "a.db"
    write_anchor(path, "r", str(ledger), KEY)
    write_anchor(path, "r", str(tmp_path / "b.db"), "cd" * 32)
    write_anchor(path, "r2", str(ledger), None)
    # The same file by a relative path, and as a sqlite URL.
    monkeypatch.chdir(tmp_path)
    assert read_pin(path, "r", "a.db").key_ids == [KEY]
    assert read_pin(path, "r", f"sqlite:///{ledger}").key_ids == [KEY]
    assert read_pin(path, "r2", str(ledger)).unsigned
    other = read_pin(path, "r", str(tmp_path / "c.db"))
    assert other.key_ids is None and len(other.elsewhere) == 2


def test_written_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "trainguard" / "anchors.jsonl"
    write_anchor(path, "r", LEDGER, KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o666)
    with pytest.raises(ValueError, match="not the user's own"):
        write_anchor(path, "r", LEDGER, KEY)


def test_off_and_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for off in ("off", "OFF", "0", "none", ""):
        monkeypatch.setenv(anchorfile.ANCHORS_ENV, off)
        assert default_path() is None
    monkeypatch.delenv(anchorfile.ANCHORS_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "trainguard" / "anchors.jsonl"


WRITER = """
import sys
from pathlib import Path
from trainguard.ledger.anchorfile import write_anchor
for n in range(int(sys.argv[3])):
    write_anchor(Path(sys.argv[1]), f"{sys.argv[2]}-{n}-" + "x" * (n % 700), "/l.db", "ab" * 32)
"""


def test_concurrent_writers_leave_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "anchors.jsonl"
    writers, each = 4, 150
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", str(each)])
        for w in range(writers)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    lines = path.read_bytes().splitlines()
    assert len(lines) == writers * each
    assert all(json.loads(line)["ledger"] == "/l.db" for line in lines)
    assert read_pin(path, "w3-7-" + "x" * 7, "/l.db").key_ids == ["ab" * 32]


def test_only_a_store_with_a_location_gets_an_anchor(tmp_path: Path) -> None:
    """The recorder anchors rank 0 of a ledger verify can open by its location; an
    in-memory capture (replay makes hundreds of guards) or a later rank writes none."""
    from trainguard.monitor.recorder import Recorder

    path = Path(os.environ[anchorfile.ANCHORS_ENV])

    class Capture:  # what replay's guards write to: no location
        def append(self, *args: object, **kwargs: object) -> None: ...

    Recorder(Capture(), "replay:r", 0, sign_key=False)  # type: ignore[arg-type]
    Recorder(str(tmp_path / "l.db"), "r", 1)
    assert not path.exists()
    Recorder(str(tmp_path / "l.db"), "r", 0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["run_id"], e["ledger"], e["signed"]) for e in lines] == [
        ("r", str((tmp_path / "l.db").resolve()), True)
    ]


def test_an_anchor_file_named_on_the_command_line_must_exist(tmp_path: Path) -> None:
    from trainguard.cli.main import main
    from trainguard.ledger import open_ledger

    url = str(tmp_path / "l.db")
    ledger = open_ledger(url)
    ledger.append("r", "step", {"loss": 1.0}, step=0, stream=0)
    ledger.close()
    args = ["ledger", "verify", "r", "--ledger", url]
    assert main([*args, "--anchors", str(tmp_path / "typo.jsonl")]) == 2
    write_anchor(tmp_path / "a.jsonl", "r", url, KEY)
    # Pinned from the named file: this ledger's stream 0 carries no key at all.
    assert main([*args, "--anchors", str(tmp_path / "a.jsonl")]) == 1
    assert main([*args, "--no-anchors"]) == 0
