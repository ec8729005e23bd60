"""The lenient zip reader reads what torch reads, reports every oddity, and stays bounded.

Most archives are built with zipfile and then patched with struct, so each test
shows the one byte range that makes zipfile and torch disagree.
"""

from __future__ import annotations

import bz2
import io
import json
import random
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard.errors import LimitExceeded, ScanError
from trainguard.limits import GiB, Limits, MiB
from trainguard.scanner.ziplenient import (
    ZipDirectory,
    ZipEntry,
    looks_like_zip,
    member_crc_ok,
    open_member,
    read_directory,
)

LOCAL, CENTRAL, EOCD = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
# Field offsets inside the local (LH_) and central (CD_) headers.
LH_FLAGS, LH_CRC, LH_NAME = 6, 14, 30
CD_FLAGS, CD_CRC, CD_CSIZE, CD_ATTR, CD_OFFSET = 8, 16, 20, 38, 42


# ------------------------------------------------------------------ helpers


def make_zip(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def read(data: bytes, limits: Limits | None = None) -> ZipDirectory:
    f = io.BytesIO(data)
    return read_directory(f, len(data)) if limits is None else read_directory(f, len(data), limits)


def kinds(d: ZipDirectory) -> set[str]:
    return {a.kind for a in d.anomalies}


def member_bytes(data: bytes, entry: ZipEntry, limits: Limits | None = None) -> bytes:
    f = io.BytesIO(data)
    stream = open_member(f, entry) if limits is None else open_member(f, entry, limits)
    return stream.read()


def central_offsets(data: bytes) -> list[int]:
    """Offsets of the central headers, found through the end record (no comment)."""
    eocd = len(data) - 22
    count, _size, pos = struct.unpack_from("<HII", data, eocd + 10)
    out = []
    for _ in range(count):
        out.append(pos)
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + nlen + xlen + clen
    return out


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def write_raw_zip(
    out: BinaryIO,
    members: list[tuple[str, bytes | int, int, int, int]],
    *,
    zip64: bool = False,
    declared_count: int | None = None,
) -> None:
    """Write a zip by hand: (name, payload or a length of sparse zeros, method, crc, size).

    With zip64, every size and offset lives in ZIP64 extra fields and records, as
    torch writes them for checkpoints over 4 GiB.
    """
    central = bytearray()
    for name, payload, method, crc, size in members:
        offset, raw = out.tell(), name.encode()
        csize = payload if isinstance(payload, int) else len(payload)
        if zip64:
            lextra = struct.pack("<HHQQ", 1, 16, size, csize)
            cextra = struct.pack("<HHQQQ", 1, 24, size, csize, offset)
            lsizes = csizes = (0xFFFFFFFF, 0xFFFFFFFF)
            coff = 0xFFFFFFFF
        else:
            lextra = cextra = b""
            lsizes = csizes = (csize, size)
            coff = offset
        out.write(
            struct.pack(
                "<4sHHHHHIIIHH", LOCAL, 45, 0, method, 0, 0x21, crc, *lsizes, len(raw), len(lextra)
            )
            + raw
            + lextra
        )
        if isinstance(payload, int):
            out.seek(payload, io.SEEK_CUR)
        else:
            out.write(payload)
        # version made/needed, flags, method, time, date, crc, sizes, lengths, disk, attrs
        fixed = (45, 45, 0, method, 0, 0x21, crc, *csizes, len(raw), len(cextra), 0, 0, 0, 0)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", CENTRAL, *fixed, coff) + raw + cextra
    cd_offset = out.tell()
    out.write(central)
    n = len(members) if declared_count is None else declared_count
    if zip64:
        record = out.tell()
        out.write(
            struct.pack(
                "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(central), cd_offset
            )
        )
        out.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, record, 1))
        out.write(struct.pack("<4sHHHHIIH", EOCD, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    else:
        out.write(struct.pack("<4sHHHHIIH", EOCD, 0, 0, n, n, len(central), cd_offset, 0))


def raw_zip(
    members: list[tuple[str, bytes | int, int, int, int]],
    *,
    zip64: bool = False,
    declared_count: int | None = None,
) -> bytes:
    buf = io.BytesIO()
    write_raw_zip(buf, members, zip64=zip64, declared_count=declared_count)
    return buf.getvalue()


def torch_checkpoint() -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"weight": torch.arange(12.0).reshape(3, 4), "step": 7}, buf)
    return buf.getvalue()


# ------------------------------------------------------------ ordinary archives


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_reads_every_method_like_zipfile(method: int) -> None:
    members = [("a.txt", b"hello " * 500), ("dir/b.bin", bytes(range(256)) * 40), ("e", b"")]
    data = make_zip(members, method)
    d = read(data)
    assert d.anomalies == []
    assert [e.name for e in d.entries] == [m[0] for m in members]
    assert d.crc_checked == frozenset(range(3))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for e in d.entries:
            assert member_bytes(data, e) == z.read(e.name)
            assert member_crc_ok(io.BytesIO(data), e)


def test_torch_save_output_matches_torch_and_zipfile() -> None:
    torch = pytest.importorskip("torch")
    data = torch_checkpoint()
    d = read(data)
    assert d.anomalies == []
    prefix = d.entries[0].name.split("/")[0]
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    records = sorted(reader.get_all_records())
    assert sorted(e.name for e in d.entries) == sorted(f"{prefix}/{r}" for r in records)
    by_name = {e.name: e for e in d.entries}
    for r in records:
        assert by_name[f"{prefix}/{r}"].data_offset == reader.get_record_offset(r)
    pkl = by_name[f"{prefix}/data.pkl"]
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert member_bytes(data, pkl) == z.read(pkl.name)
    # The pickle's CRC is checked; the tensor bytes are not even read.
    checked = {d.entries[i].name for i in d.crc_checked}
    assert pkl.name in checked
    assert not any("/data/" in name for name in checked)


def test_stored_member_seeks_without_reading_and_compressed_seeks_by_reading() -> None:
    payload = bytes(range(256)) * 4096
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        data = make_zip([("m", payload)], method)
        (entry,) = read(data).entries
        s = open_member(io.BytesIO(data), entry)
        assert s.seekable()
        s.seek(700_000)
        assert s.read(10) == payload[700_000:700_010]
        s.seek(5)
        assert s.read(3) == payload[5:8]
        assert s.read(-1) == payload[8:]


def test_empty_archive() -> None:
    d = read(make_zip([]))
    assert (d.entries, d.anomalies) == ([], [])


def test_looks_like_zip() -> None:
    data = make_zip([("a", b"x")])
    assert looks_like_zip(data[:64], data[-64:])
    assert looks_like_zip(b"junk" * 16, data[-64:])
    assert not looks_like_zip(b"\x80\x02}q\x00.", b"\x80\x02}q\x00.")


# ------------------------------------------- published bypasses (each with its advisory)


def test_bad_crc_is_read_and_reported() -> None:
    """picklescan CVE-2025-10156: zipfile refuses a bad CRC, torch does not check it.
    https://github.com/mmaitre314/picklescan/security/advisories/GHSA-mjqp-26hc-grxg"""
    data = make_zip([("archive/data.pkl", b"\x80\x02K\x01.")])
    cd = central_offsets(data)[0]
    data = patch(patch(data, LH_CRC, "<I", 0xDEADBEEF), cd + CD_CRC, "<I", 0xDEADBEEF)
    with pytest.raises(zipfile.BadZipFile), zipfile.ZipFile(io.BytesIO(data)) as z:
        z.read("archive/data.pkl")
    d = read(data)
    assert "crc-mismatch" in kinds(d)
    assert member_bytes(data, d.entries[0]) == b"\x80\x02K\x01."
    assert not member_crc_ok(io.BytesIO(data), d.entries[0])


@pytest.mark.parametrize("bit", [0, 5, 6, 13])
def test_odd_flag_bits_are_read_and_reported(bit: int) -> None:
    """picklescan CVE-2025-1945: flag bits that make zipfile give up.
    https://github.com/mmaitre314/picklescan/security/advisories/GHSA-w8jq-xcqf-f792"""
    data = make_zip([("archive/data.pkl", b"\x80\x02K\x01.")])
    cd = central_offsets(data)[0]
    data = patch(patch(data, LH_FLAGS, "<H", 1 << bit), cd + CD_FLAGS, "<H", 1 << bit)
    d = read(data)
    assert "flag-bits" in kinds(d)
    if bit in (0, 6, 13):
        assert "encrypted" in kinds(d)
    assert member_bytes(data, d.entries[0]) == b"\x80\x02K\x01."


def test_level_bits_of_deflate_are_not_anomalies() -> None:
    data = make_zip([("a", b"x" * 100)], zipfile.ZIP_DEFLATED)
    cd = central_offsets(data)[0]
    data = patch(patch(data, LH_FLAGS, "<H", 2), cd + CD_FLAGS, "<H", 2)  # as `zip -9` writes
    assert read(data).anomalies == []


def test_local_name_differing_from_central_name() -> None:
    """picklescan CVE-2025-1944: zipfile refuses, torch trusts the central directory.
    https://github.com/mmaitre314/picklescan/security/advisories/GHSA-7q5r-7gvp-wc82"""
    data = bytearray(make_zip([("archive/data.pkl", b"\x80\x02K\x01.")]))
    data[LH_NAME : LH_NAME + 16] = b"archive/xxxx.txt"
    with pytest.raises(zipfile.BadZipFile), zipfile.ZipFile(io.BytesIO(data)) as z:
        z.read("archive/data.pkl")
    d = read(bytes(data))
    (entry,) = d.entries
    assert (entry.name, entry.local_name) == ("archive/data.pkl", "archive/xxxx.txt")
    assert "name-mismatch" in kinds(d)
    assert member_bytes(bytes(data), entry) == b"\x80\x02K\x01."


def test_torch_loads_what_zipfile_refuses(tmp_path: Path) -> None:
    """The premise of this module, checked in a subprocess: torch loads a checkpoint
    with a bad CRC or a renamed local header; our reader reads both."""
    pytest.importorskip("torch")
    data = torch_checkpoint()
    d = read(data)
    pkl = next(e for e in d.entries if e.name.endswith("/data.pkl"))
    cd = central_offsets(data)[[e.name for e in d.entries].index(pkl.name)]
    bad_crc = patch(
        patch(data, pkl.header_offset + LH_CRC, "<I", pkl.crc ^ 1), cd + CD_CRC, "<I", pkl.crc ^ 1
    )
    renamed = bytearray(data)
    at = pkl.header_offset + LH_NAME + len(pkl.name) - 8
    renamed[at : at + 8] = b"evil.txt"
    paths = []
    for label, variant in (("crc", bad_crc), ("name", bytes(renamed))):
        path = tmp_path / f"{label}.pt"
        path.write_bytes(variant)
        paths.append(str(path))
        assert kinds(read(variant)) & {"crc-mismatch", "name-mismatch"}
        with pytest.raises(zipfile.BadZipFile), zipfile.ZipFile(path) as z:
            z.read(pkl.name)
    script = (
        "import json, sys, torch\n"
        "print(json.dumps([torch.load(p, weights_only=True)['step'] for p in sys.argv[1:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *paths],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [7, 7]


def test_duplicate_names() -> None:
    with pytest.warns(UserWarning):
        data = make_zip([("archive/data.pkl", b"first"), ("archive/data.pkl", b"second")])
    d = read(data)
    assert "duplicate-name" in kinds(d)
    assert [member_bytes(data, e) for e in d.entries] == [b"first", b"second"]


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/cron.d/x", "C:/x", "a\\..\\..\\b"])
def test_path_escape(name: str) -> None:
    d = read(make_zip([(name, b"x")]))
    assert [a.kind for a in d.anomalies] == ["path-escape"]


def test_symlink() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    assert kinds(read(buf.getvalue())) == {"symlink"}


def test_unicode_path_extra_field_naming_another_member() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("weights.bin")
        alias = b"data.pkl"
        info.extra = struct.pack("<HHB", 0x7075, 5 + len(alias), 1) + b"\0" * 4 + alias
        z.writestr(info, b"\x80\x02.")
    assert kinds(read(buf.getvalue())) == {"name-mismatch"}


def test_two_central_entries_sharing_one_local_header_overlap() -> None:
    data = make_zip([("a", b"x" * 100), ("b", b"y" * 100)])
    data = patch(data, central_offsets(data)[1] + CD_OFFSET, "<I", 0)
    d = read(data)
    assert {"overlap", "name-mismatch", "hidden-entry"} <= kinds(d)  # b is orphaned


def test_hidden_local_entry_between_members() -> None:
    """A streaming reader would see a member the central directory does not list."""
    data = make_zip([("a", b"x" * 100)])
    hidden = make_zip([("evil.pkl", b"\x80\x02.")])
    cd = central_offsets(data)[0]
    hidden_local = hidden[: central_offsets(hidden)[0]]
    data = data[:cd] + hidden_local + data[cd:]
    data = patch(data, len(data) - 6, "<I", cd + len(hidden_local))
    assert "hidden-entry" in kinds(read(data))


def test_prepended_and_trailing_data() -> None:
    data = make_zip([("a", b"payload")])
    d = read(b"#!/bin/sh\n" + data)
    assert "prepended-data" in kinds(d)
    assert member_bytes(b"#!/bin/sh\n" + data, d.entries[0]) == b"payload"
    assert "trailing-data" in kinds(read(data + b"\0" * 100))


# --------------------------------------------------------------------------- ZIP64


def test_force_zip64_member() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, z.open("big", "w", force_zip64=True) as w:
        w.write(b"abc" * 1000)
    data = buf.getvalue()
    d = read(data)
    assert d.anomalies == []
    assert member_bytes(data, d.entries[0]) == b"abc" * 1000


def test_synthetic_zip64_end_records_and_extra_fields() -> None:
    payload = b"\x80\x02K\x01."
    data = raw_zip(
        [
            ("archive/data.pkl", payload, 0, zlib.crc32(payload), len(payload)),
            ("archive/data/0", b"\0" * 64, 0, zlib.crc32(b"\0" * 64), 64),
        ],
        zip64=True,
    )
    d = read(data)
    assert d.anomalies == []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert [i.filename for i in z.infolist()] == [e.name for e in d.entries]
        assert [i.header_offset for i in z.infolist()] == [e.header_offset for e in d.entries]
        assert member_bytes(data, d.entries[0]) == z.read("archive/data.pkl")


def test_ten_gib_checkpoint_directory_is_read_without_touching_tensor_bytes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.pt"
    pkl = b"\x80\x02}q\x00."
    big = 10 * GiB
    with path.open("wb") as out:
        write_raw_zip(
            out,
            [
                ("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                ("archive/data/0", big, 0, 0, big),
                ("archive/version", b"3\n", 0, zlib.crc32(b"3\n"), 2),
            ],
            zip64=True,
        )
    size = path.stat().st_size
    assert size > big
    with path.open("rb") as f:
        started = time.perf_counter()
        d = read_directory(f, size)
        stream = open_member(f, d.entries[1])
        stream.seek(big - 4)
        tail = stream.read()
        assert time.perf_counter() - started < 2.0
        assert d.anomalies == []
        assert open_member(f, d.entries[0]).read() == pkl
        assert tail == b"\0" * 4
    with zipfile.ZipFile(path) as z:
        assert [(i.filename, i.header_offset, i.compress_size) for i in z.infolist()] == [
            (e.name, e.header_offset, e.compressed_size) for e in d.entries
        ]


def test_eocd_claiming_a_billion_entries_is_refused_quickly() -> None:
    data = raw_zip([("a", b"x", 0, zlib.crc32(b"x"), 1)], zip64=True, declared_count=10**9)
    started = time.perf_counter()
    with pytest.raises(LimitExceeded):
        read(data)
    assert time.perf_counter() - started < 1.0


def test_entry_count_that_does_not_match_the_directory() -> None:
    data = raw_zip([("a", b"x", 0, zlib.crc32(b"x"), 1)], declared_count=65535)
    d = read(data)
    assert [e.name for e in d.entries] == ["a"]
    assert "entry-count-mismatch" in kinds(d)


# ------------------------------------------------------------------- broken input


def test_offsets_past_end_of_file() -> None:
    data = make_zip([("a", b"x" * 100), ("b", b"y" * 100)])
    cds = central_offsets(data)
    data = patch(data, cds[0] + CD_OFFSET, "<I", 10**8)
    data = patch(data, cds[1] + CD_CSIZE, "<I", 10**8)
    d = read(data)
    a, b = d.entries
    assert a.data_offset == -1
    assert [x.kind for x in d.anomalies if x.member in ("a", "b")].count("out-of-bounds") == 2
    with pytest.raises(ScanError):
        open_member(io.BytesIO(data), a)
    assert member_bytes(data, b).startswith(b"y" * 100)  # whatever lies before the end


def test_truncated_checkpoint_falls_back_to_local_headers() -> None:
    data = torch_checkpoint()
    d = read(data)
    pkl = next(e for e in d.entries if e.name.endswith("/data.pkl"))
    expected = member_bytes(data, pkl)
    cut = d.entries[-1].header_offset + 10  # mid-way through the last local header
    t = read(data[:cut])
    assert "no-central-directory" in kinds(t)
    assert member_bytes(data[:cut], t.entries[0]) == expected
    for n in range(0, len(data), max(1, len(data) // 97)):
        try:
            read(data[:n])
        except ScanError:
            pass


def test_streamed_zip_without_central_directory() -> None:
    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.buf += b
            return len(b)

    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("one", b"1" * 1000)
        z.writestr("two", b"2" * 1000)
    data = bytes(sink.buf)
    no_cd = data[: data.index(CENTRAL)]
    d = read(no_cd)
    assert "no-central-directory" in kinds(d)
    assert [member_bytes(no_cd, e) for e in d.entries] == [b"1" * 1000, b"2" * 1000]


def test_garbage_is_not_a_zip() -> None:
    rng = random.Random(1)
    for n in (0, 3, 22, 5000):
        blob = bytes(rng.randrange(256) for _ in range(n))
        with pytest.raises(ScanError, match="not a zip"):
            read(blob)
    with pytest.raises(ScanError, match="not a zip"):
        read(b"\x80\x02" + b"x" * 100 + EOCD + b"\xff" * 30)


def test_deflate_bomb_stops_at_the_ratio_and_size_caps() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, parts, crc = bytes(MiB), [], 0
    for _ in range(200):
        parts.append(comp.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(comp.flush())
    data = raw_zip([("bomb", b"".join(parts), 8, crc, 200 * MiB)])
    d = read(data)
    assert d.crc_checked == frozenset()  # too big to check while reading the directory
    started = time.perf_counter()
    with pytest.raises(LimitExceeded):  # zlib packs zeros about 1030:1, past the default 1000
        member_bytes(data, d.entries[0])
    with pytest.raises(LimitExceeded, match="ratio"):
        member_bytes(data, d.entries[0], Limits(max_compression_ratio=100))
    with pytest.raises(LimitExceeded, match="decompressed size"):
        member_bytes(
            data, d.entries[0], Limits(max_compression_ratio=10**9, max_decompressed_size=20 * MiB)
        )
    assert time.perf_counter() - started < 5.0


def test_bzip2_bomb_stops_at_the_ratio_cap() -> None:
    payload = bz2.compress(bytes(20 * MiB))
    data = raw_zip([("bomb", payload, 12, 0, 20 * MiB)])
    (entry,) = read(data).entries
    with pytest.raises(LimitExceeded, match="ratio"):
        member_bytes(data, entry)


def test_corrupt_deflate_data_is_a_scan_error() -> None:
    data = raw_zip([("x", b"\xff" * 64, 8, 0, 100)])
    d = read(data)
    assert "bad-compressed-data" in kinds(d)
    with pytest.raises(ScanError):
        member_bytes(data, d.entries[0])


# ------------------------------------------------------------------------ fuzzing

SEED_ZIP = make_zip(
    [("archive/data.pkl", b"\x80\x02}q\x00." * 20), ("archive/x", b"abc" * 50)],
    zipfile.ZIP_DEFLATED,
)
FUZZ_LIMITS = Limits(max_decompressed_size=4 * MiB, max_archive_members=1000)


@settings(
    max_examples=fuzz_examples(300), deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(SEED_ZIP) - 1), st.integers(0, 255)), max_size=8),
    words=st.lists(
        st.tuples(
            st.integers(0, len(SEED_ZIP) - 4),
            st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 10**6]),
        ),
        max_size=3,
    ),
    cut=st.integers(0, len(SEED_ZIP)),
)
def test_mutated_zips_only_raise_scan_errors(
    edits: list[tuple[int, int]], words: list[tuple[int, int]], cut: int
) -> None:
    """Random byte and field edits: the reader returns or raises ScanError, quickly."""
    data = bytearray(SEED_ZIP)
    for pos, value in edits:
        data[pos] = value
    for pos, value in words:
        struct.pack_into("<I", data, pos, value)
    blob = bytes(data[:cut]) if cut % 3 == 0 else bytes(data)
    try:
        d = read(blob, FUZZ_LIMITS)
    except ScanError:
        return
    for e in d.entries:
        try:
            member_bytes(blob, e, FUZZ_LIMITS)
            member_crc_ok(io.BytesIO(blob), e, FUZZ_LIMITS)
        except ScanError:
            pass
