"""A hand-written zip writer that lays members out the way ``torch.save`` does.

torch (miniz, ``PyTorchStreamWriter``) writes stored members, flag bits
0x0808 (data descriptor + UTF-8 name), zeroed CRC and sizes in the local
header followed by a ``PK\\x07\\x08`` descriptor, and pads each local header
with an ``FB`` extra field so member data starts on a 64-byte boundary.
Its reader (``PyTorchStreamReader``) looks members up by the central
directory, takes the data offset from the local header's lengths and does not
verify CRCs or compare the two names.  Python's :mod:`zipfile` is stricter.
Each knob here produces one of the disagreements scanners were fooled by:
``crc`` (CVE-2025-10156), ``flags``/``local_flags`` (CVE-2025-1945),
``local_name`` (CVE-2025-1944) and repeated names.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

TORCH_FLAGS = 0x0808  # bit 3: sizes in a data descriptor; bit 11: UTF-8 name
TORCH_ALIGNMENT = 64
_U32_MAX = 0xFFFFFFFF
_EXTRA_ALIGN_ID = 0x4246  # "FB", the id torch gives its padding field
_EXTRA_ZIP64_ID = 0x0001


@dataclass(frozen=True)
class ZipMember:
    """One member and the lies its headers tell about it."""

    name: str
    data: bytes
    local_name: str | None = None  # name written in the local header, if different
    crc: int | None = None  # CRC recorded in place of the real one
    flags: int = TORCH_FLAGS  # general-purpose bits, central directory
    local_flags: int | None = None  # general-purpose bits, local header (default: flags)


@dataclass
class _Entry:
    name: bytes
    flags: int
    crc: int
    size: int
    offset: int
    zip64: bool


class ZipWriter:
    """Write stored members one after another; ``close`` writes the directory."""

    def __init__(
        self, f: BinaryIO, *, align: int = TORCH_ALIGNMENT, force_zip64: bool = False
    ) -> None:
        self._f = f
        self._align = align
        self._force_zip64 = force_zip64
        self._entries: list[_Entry] = []
        self._pos = f.tell()

    def add(self, member: ZipMember) -> None:
        self.add_stream(
            member.name,
            len(member.data),
            [member.data],
            local_name=member.local_name,
            crc=member.crc,
            flags=member.flags,
            local_flags=member.local_flags,
        )

    def add_stream(
        self,
        name: str,
        size: int,
        chunks: Iterable[bytes],
        *,
        local_name: str | None = None,
        crc: int | None = None,
        flags: int = TORCH_FLAGS,
        local_flags: int | None = None,
    ) -> None:
        """Stream ``size`` bytes from ``chunks`` without holding them in memory."""
        offset = self._pos
        zip64 = self._force_zip64 or size >= _U32_MAX or offset >= _U32_MAX
        lname = (local_name if local_name is not None else name).encode("utf-8")
        lflags = flags if local_flags is None else local_flags
        descriptor = bool(lflags & 0x0008)
        extra = b""
        if zip64:
            extra += struct.pack(
                "<HHQQ", _EXTRA_ZIP64_ID, 16, 0 if descriptor else size, 0 if descriptor else size
            )
        extra += self._padding(offset + 30 + len(lname) + len(extra))
        real_crc = 0
        written = 0
        # The header's CRC/sizes are only known up front without a descriptor,
        # so a descriptor-less member is written after a first pass over chunks.
        chunk_list: Iterable[bytes] = chunks
        if not descriptor:
            buffered = list(chunks)
            for c in buffered:
                real_crc = zlib.crc32(c, real_crc)
            chunk_list = buffered
        header_crc = 0 if descriptor else (real_crc if crc is None else crc)
        header_size = 0 if descriptor else (_U32_MAX if zip64 else size)
        self._write(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                45 if zip64 else 20,
                lflags,
                0,
                0,
                0,
                header_crc,
                header_size,
                header_size,
                len(lname),
                len(extra),
            )
            + lname
            + extra
        )
        for c in chunk_list:
            if descriptor:
                real_crc = zlib.crc32(c, real_crc)
            written += len(c)
            self._write(c)
        if written != size:
            raise ValueError(f"{name}: promised {size} bytes, got {written}")
        recorded = real_crc if crc is None else crc
        if descriptor:
            if zip64:
                self._write(struct.pack("<4sIQQ", b"PK\x07\x08", recorded, size, size))
            else:
                self._write(struct.pack("<4sIII", b"PK\x07\x08", recorded, size, size))
        self._entries.append(_Entry(name.encode("utf-8"), flags, recorded, size, offset, zip64))

    def close(self) -> None:
        cd_start = self._pos
        for e in self._entries:
            extra = b""
            size32, off32 = e.size, e.offset
            if e.zip64:
                extra = struct.pack("<HHQQQ", _EXTRA_ZIP64_ID, 24, e.size, e.size, e.offset)
                size32 = off32 = _U32_MAX
            self._write(
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    45 if e.zip64 else 20,
                    45 if e.zip64 else 20,
                    e.flags,
                    0,
                    0,
                    0,
                    e.crc,
                    size32,
                    size32,
                    len(e.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    off32,
                )
                + e.name
                + extra
            )
        cd_size = self._pos - cd_start
        count = len(self._entries)
        if self._force_zip64 or cd_start >= _U32_MAX or count >= 0xFFFF:
            eocd64 = self._pos
            self._write(
                struct.pack(
                    "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_start
                )
            )
            self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
            count16 = min(count, 0xFFFF)
            self._write(
                struct.pack(
                    "<4sHHHHIIH",
                    b"PK\x05\x06",
                    0,
                    0,
                    count16,
                    count16,
                    min(cd_size, _U32_MAX),
                    min(cd_start, _U32_MAX),
                    0,
                )
            )
        else:
            self._write(
                struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_start, 0)
            )

    def _padding(self, data_start_without_pad: int) -> bytes:
        if self._align <= 1:
            return b""
        pad = (-(data_start_without_pad + 4)) % self._align
        return struct.pack("<HH", _EXTRA_ALIGN_ID, pad) + b"Z" * pad

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._pos += len(data)


def write_zip(
    path: Path,
    members: Iterable[ZipMember],
    *,
    align: int = TORCH_ALIGNMENT,
    force_zip64: bool = False,
) -> Path:
    with open(path, "wb") as f:
        _write_members(f, members, align, force_zip64)
    return path


def zip_bytes(members: Iterable[ZipMember], *, align: int = TORCH_ALIGNMENT) -> bytes:
    buf = io.BytesIO()
    _write_members(buf, members, align, False)
    return buf.getvalue()


def _write_members(
    f: BinaryIO, members: Iterable[ZipMember], align: int, force_zip64: bool
) -> None:
    w = ZipWriter(f, align=align, force_zip64=force_zip64)
    for m in members:
        w.add(m)
    w.close()


def torch_members(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    pickle_name: str = "data.pkl",
) -> list[ZipMember]:
    """The members of a ``torch.save`` checkpoint, in torch's order."""
    storages = storages or {}
    members = [
        ZipMember(f"{prefix}/{pickle_name}", data_pkl),
        ZipMember(f"{prefix}/.format_version", b"1"),
        ZipMember(f"{prefix}/.storage_alignment", str(TORCH_ALIGNMENT).encode()),
        ZipMember(f"{prefix}/byteorder", b"little"),
    ]
    members += [ZipMember(f"{prefix}/data/{key}", data) for key, data in storages.items()]
    members += [
        ZipMember(f"{prefix}/version", b"3\n"),
        # torch writes a random 40-digit id; a fixed one keeps samples reproducible.
        ZipMember(f"{prefix}/.data/serialization_id", b"0" * 40),
    ]
    return members


def replace_member(members: list[ZipMember], name: str, **changes: Any) -> list[ZipMember]:
    """A copy of ``members`` where the member called ``name`` has ``changes``."""
    if not any(m.name == name for m in members):
        raise KeyError(name)
    return [dataclasses.replace(m, **changes) if m.name == name else m for m in members]
