"""HDF5 is parsed by libhdf5 in an isolated child: a file that crashes the library is a
finding (TG004), never a crashed scan.

Found by the long fuzz run (bench/fuzz_long.sh): one changed byte in the datatype
message of a root attribute makes libhdf5 (through h5py) segfault while reading it,
as any Keras loader of the file would.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trainguard import scan_file
from trainguard.findings import Severity
from trainguard.scanner.isolated import run_child

pytest.importorskip("h5py")

# What a legacy Keras loader does first: open the file, read the model_config attribute.
_KERAS_LIKE_READ = """
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    f.attrs["model_config"]
print("read")
"""


def crashing_h5(folder: Path) -> Path:
    """A benign legacy Keras .h5 with one byte of its model_config attribute header changed."""
    from trainguard.samples.fmt_keras import _input, _legacy, write_legacy_h5

    config = _legacy(
        [
            _input("input_layer", [None, 4]),
            {"class_name": "Dense", "config": {"name": "dense", "units": 2}},
        ]
    )
    path = write_legacy_h5(folder / "benign.h5", config, {})
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"model_config") + 17] = 143  # a datatype message field of the attribute
    bad = folder / "crashing.h5"
    bad.write_bytes(bytes(blob))
    return bad


def test_the_sample_really_crashes_the_library(tmp_path: Path) -> None:
    bad = crashing_h5(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _KERAS_LIKE_READ, str(bad)], capture_output=True, timeout=60
    )
    assert proc.returncode < 0, (proc.returncode, proc.stderr[-500:])
    good = subprocess.run(
        [sys.executable, "-c", _KERAS_LIKE_READ, str(tmp_path / "benign.h5")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0 and "read" in good.stdout


def test_a_crashing_file_is_a_critical_finding_and_the_scan_goes_on(tmp_path: Path) -> None:
    bad = crashing_h5(tmp_path)
    result = scan_file(bad)
    assert [f.rule for f in result.findings] == ["TG004"]
    assert result.findings[0].severity == Severity.CRITICAL
    assert "crashed (SIGSEGV)" in result.findings[0].message
    assert scan_file(tmp_path / "benign.h5").findings == []


def test_a_crashing_member_of_an_archive_is_caught_too(tmp_path: Path) -> None:
    bad = crashing_h5(tmp_path)
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(bad, "models/crashing.h5")
    rules = [f.rule for f in scan_file(archive).findings]
    assert "TG004" in rules


def test_a_hang_or_a_memory_bomb_in_the_child_is_reported() -> None:
    slow = run_child("import time; ready(); time.sleep(30)", [], timeout=1.0)
    assert slow.output is None and slow.problem == "did not finish within 1 s"
    assert slow.ready and slow.timed_out
    greedy = run_child("ready(); x = bytearray(16 << 30)", [], timeout=20.0)
    assert greedy.output is None and greedy.problem is not None and greedy.ready
    assert "memory" in greedy.problem or "crashed" in greedy.problem
    fine = run_child("import json; ready(); print(json.dumps({'argv': sys.argv[1:]}))", ["a", "b"])
    assert fine.output == {"argv": ["a", "b"]}


def test_a_child_that_fails_before_reading_is_a_scan_error_not_a_finding() -> None:
    broken = run_child("import no_such_module_here", [])
    assert broken.output is None and not broken.ready
    assert "before it was ready" in (broken.problem or "")
