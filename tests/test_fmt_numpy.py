"""numpy object arrays are found by what numpy's header parser would build, not by spelling.

``np.load(allow_pickle=True)`` unpickles the data after the header whenever the
dtype has objects; the dtype can be spelled many ways.  Each spelling here is
proven (in a subprocess) to make numpy run the payload, and must be caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainguard import Severity, scan_file
from trainguard.scanner.formats.dtypes import provably_numeric

_OBJECT_SPELLINGS: list[object] = [
    "O",
    "|O",
    "object",
    "O8",
    "i4,O",
    "(2,)O",
    [("a", "<f4"), ("b", "|O")],
    ("|O", (2,)),
]
_NUMERIC: list[object] = ["<f4", "|b1", "<M8[ns]", "|S5", "<U3", [("a", "<f4"), ("b", "<i8", (2,))]]


def _npy(descr: object, payload: bytes) -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': (1,), }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    raw = header.encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + payload


def _payload(canary: Path) -> bytes:
    cmd = f"touch {canary}".encode()
    return b"cposix\nsystem\n(S'" + cmd + b"'\ntR."


def test_every_object_spelling_fires_under_numpy_and_is_caught(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    files = []
    for i, descr in enumerate(_OBJECT_SPELLINGS):
        path = tmp_path / f"a{i}.npy"
        path.write_bytes(_npy(descr, _payload(tmp_path / f"canary{i}")))
        files.append(str(path))
        result = scan_file(path)
        assert result.verdict is Severity.CRITICAL, (descr, result.findings)
    loader = (
        "import sys, numpy\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        numpy.load(p, allow_pickle=True)\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", loader, *files], timeout=120, check=True)
    fired = [d for i, d in enumerate(_OBJECT_SPELLINGS) if (tmp_path / f"canary{i}").exists()]
    assert fired == _OBJECT_SPELLINGS


@pytest.mark.parametrize("descr", _NUMERIC, ids=str)
def test_numeric_dtypes_are_data(descr: object, tmp_path: Path) -> None:
    assert provably_numeric(descr)
    path = tmp_path / "a.npy"
    path.write_bytes(_npy(descr, b"\x00" * 64))
    assert scan_file(path).verdict is None


@pytest.mark.parametrize("descr", ["object_", "float128x", "i4,f4", {"names": ["a"]}, 5, "P8"])
def test_what_cannot_be_proved_numeric_carries_a_pickle(descr: object) -> None:
    assert not provably_numeric(descr)
