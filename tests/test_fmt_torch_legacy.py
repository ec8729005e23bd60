"""PyTorch's legacy tar checkpoints: every pickle torch.load reads in them is analysed.

``storages`` and ``tensors`` hold pickles interleaved with raw data; a payload in
the second storage's header runs under ``torch.load`` although the first pickle
is harmless.  The test proves it fires (in a subprocess) and is caught.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from trainguard import Severity, scan_file

_FLOAT_ARGS = b"\x80\x02(X\x01\x00\x00\x00kX\x03\x00\x00\x00cpuctorch\nFloatStorage\ntq\x00."


def _storages(second_header: bytes) -> bytes:
    floats = struct.pack("<q", 2) + struct.pack("<2f", 1.0, 2.0)
    views = pickle.dumps([], protocol=2)
    return pickle.dumps(2, protocol=2) + _FLOAT_ARGS + floats + second_header + floats + views


def _legacy_tar(path: Path, storages: bytes) -> Path:
    members = {"storages": storages, "tensors": pickle.dumps(0, 2), "pickle": pickle.dumps({}, 2)}
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_payload_in_the_second_storage_header_fires_and_is_caught(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    canary = tmp_path / "canary"
    payload = f"cposix\nsystem\n(S'touch {canary}'\ntR.".encode()
    path = _legacy_tar(tmp_path / "model.pt", _storages(payload))
    result = scan_file(path)
    assert result.verdict is Severity.CRITICAL, result.findings
    assert any(f.member == "storages" and f.rule == "TG101" for f in result.findings)
    loader = (
        "import sys, torch\n"
        "try:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", loader, str(path)], timeout=120, check=True)
    assert canary.exists()


def test_an_honest_legacy_tar_is_clean(tmp_path: Path) -> None:
    path = _legacy_tar(tmp_path / "model.pt", _storages(_FLOAT_ARGS))
    result = scan_file(path)
    assert result.verdict is None or result.verdict <= Severity.LOW, result.findings


def test_a_storage_type_it_cannot_size_is_reported(tmp_path: Path) -> None:
    odd = _FLOAT_ARGS.replace(b"FloatStorage", b"OddStorage")
    result = scan_file(_legacy_tar(tmp_path / "model.pt", pickle.dumps(1, 2) + odd))
    assert result.verdict is not None and result.verdict >= Severity.HIGH, result.findings
