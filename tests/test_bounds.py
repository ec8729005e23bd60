"""Hostile input: bombs, deep nesting, truncation and garbage never crash or hang."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import pickle
import random
import tarfile
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from tests.helpers import call1
from trainguard import Severity, scan, scan_bytes
from trainguard.limits import Limits


def test_random_garbage_is_unknown_not_clean_or_crash() -> None:
    rng = random.Random(7)
    for _ in range(50):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4000)))
        result = scan_bytes(data)
        assert result.error is None, result.error


@settings(
    max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    result = scan_bytes(data)
    assert result.error is None, result.error


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.data())
def test_fuzz_mutated_pickles_never_crash(data: st.DataObject) -> None:
    base = bytearray(
        pickle.dumps({"a": [1, 2.0, "x", b"y"], "b": (None, True)}, protocol=4)
        + call1("os", "system", "id")
    )
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(base)))
    result = scan_bytes(bytes(base[:cut]))
    assert result.error is None, result.error


def test_truncated_pickle_is_reported() -> None:
    data = pickle.dumps(list(range(100)), protocol=2)[:-10]
    rules = {f.rule for f in scan_bytes(data).findings}
    assert "TG107" in rules


def test_gzip_bomb_stops_at_the_limit() -> None:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as gz:
        gz.write(pickle.PROTO + b"\x04" + pickle.MARK)
        chunk = b"N0" * (1 << 19)  # NONE, POP: valid opcodes forever
        for _ in range(200):
            gz.write(chunk)
    limits = Limits(max_decompressed_size=64 << 20)
    result = scan_bytes(out.getvalue(), limits=limits)
    assert result.error is None
    assert {f.rule for f in result.findings} & {"TG002", "TG206"}
    assert max(f.severity for f in result.findings) >= Severity.HIGH


def test_compression_ratio_bomb() -> None:
    data = zlib.compress(b"\x00" * (50 << 20), 9)
    result = scan_bytes(bz2.compress(data))  # zlib inside bz2: two layers
    assert result.error is None


def test_nesting_depth_is_capped(tmp_path: Path) -> None:
    payload = call1("os", "system", "id")
    for _ in range(12):
        payload = gzip.compress(payload)
    result = scan_bytes(payload, limits=Limits(max_archive_depth=4))
    assert "TG205" in {f.rule for f in result.findings}
    assert result.verdict is not None and result.verdict >= Severity.HIGH


def test_deep_mark_nesting_hits_a_limit() -> None:
    data = pickle.PROTO + b"\x02" + pickle.MARK * 200_000 + pickle.STOP
    result = scan_bytes(data, limits=Limits(max_stack_depth=1000))
    assert "TG002" in {f.rule for f in result.findings}


def test_huge_declared_length_is_not_allocated() -> None:
    data = pickle.PROTO + b"\x04" + pickle.BINBYTES8 + (1 << 60).to_bytes(8, "little")
    result = scan_bytes(data)
    assert "TG107" in {f.rule for f in result.findings}


def test_tar_with_path_escape_and_payload(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.tar"
    payload = call1("os", "system", "id")
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../../etc/evil.pkl")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    rules = {f.rule for f in scan([path]).findings}
    assert {"TG207", "TG101"} <= rules


def test_unreadable_file_is_an_error_not_clean(tmp_path: Path) -> None:
    path = tmp_path / "secret.pkl"
    path.write_bytes(b"x")
    os.chmod(path, 0)
    report = scan([path])
    if os.geteuid() == 0:  # root reads anything; nothing to prove here
        return
    assert report.exit_code() == 2
