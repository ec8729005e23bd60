"""Reading one zip member: bounded, seekable streams over stored or compressed data.

Split from :mod:`ziplenient` (which finds the members): every read checks the
declared sizes against the file and :class:`~trainguard.limits.Limits`, and a
decompressor stops at the member's declared size or the ratio limit, whichever
comes first.
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from trainguard.errors import LimitExceeded, ScanError
from trainguard.limits import DEFAULT_LIMITS, Limits, MiB

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_LZMA_DICT = 64 * MiB  # liblzma allocates the declared dictionary up front
CHUNK = 1 * MiB
_INPUT_CHUNK = 64 * 1024  # small, so the compression ratio is measured closely
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
_SUPPORTED_METHODS = frozenset({STORED, DEFLATED, BZIP2, LZMA})


@dataclass(frozen=True)
class ZipEntry:
    """One member as the central directory (or, failing that, its local header) declares it.

    ``data_offset`` is -1 when the local header cannot be read; such a member
    cannot be opened by any reader.
    """

    name: str
    local_name: str
    header_offset: int
    data_offset: int
    compressed_size: int
    size: int
    crc: int
    method: int
    flags: int
    external_attr: int


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Inflater:
    """zlib's raw inflater behind bz2's interface: it keeps its unconsumed input."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(-15)
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def unconsumed(self) -> int:
        return len(self._tail)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._d.decompress(data or self._tail, max(max_length, 0))
        self._tail = self._d.unconsumed_tail
        return out


def _lzma_decoder(header: bytes) -> lzma.LZMADecompressor:
    """Zip's LZMA: 2-byte version, 2-byte properties length, then LZMA1 properties."""
    if len(header) < 9:
        raise ScanError("LZMA member too short for its properties")
    props = header[4:9]
    d = props[0]
    if d >= 9 * 5 * 5:
        raise ScanError("LZMA member has invalid properties")
    dict_size = min(int.from_bytes(props[1:5], "little"), MAX_LZMA_DICT)
    filt = {
        "id": lzma.FILTER_LZMA1,
        "lc": d % 9,
        "lp": (d // 9) % 5,
        "pb": d // 45,
        "dict_size": max(dict_size, 4096),
    }
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[filt])
    except lzma.LZMAError as exc:  # e.g. lc + lp > 4, which liblzma rejects
        raise ScanError(f"LZMA member has unusable properties: {exc}") from exc


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of ``f`` from ``start``."""

    def __init__(self, f: BinaryIO, start: int, length: int, limits: Limits) -> None:
        # A declared length can reach 2**64; clamp it to the bytes that exist.
        available = f.seek(0, io.SEEK_END) - start
        self._f, self._start, self._len, self._pos = f, start, max(min(length, available), 0), 0
        self._limits = limits

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}
        if whence not in bases:
            raise ValueError(f"invalid whence {whence}")
        base = bases[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read_chunk(self, n: int) -> bytes:
        n = min(n, self._len - self._pos)
        if n <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        direct = getattr(self._f, "readinto", None)
        if direct is not None:  # straight into the caller's buffer: tensors skip a copy
            got = int(direct(view[:n]) or 0)
        else:
            data = self._f.read(n)
            got = len(data)
            view[:got] = data
        self._pos += got
        return got

    def readall(self) -> bytes:
        if self._len - self._pos > self._limits.max_member_size:
            raise LimitExceeded("stored member size", self._limits.max_member_size)
        parts = []
        while chunk := self.read_chunk(CHUNK):
            parts.append(chunk)
        return b"".join(parts)


class _Decompressing(io.RawIOBase):
    """Incremental decompression of one member, bounded in size and ratio.

    Seeking forward decompresses and discards; seeking backward starts over.
    """

    def __init__(self, f: BinaryIO, entry: ZipEntry, limits: Limits) -> None:
        self._raw = _Window(f, entry.data_offset, entry.compressed_size, limits)
        self._entry, self._limits = entry, limits
        self._restart()

    def _restart(self) -> None:
        self._raw.seek(0)
        self._pos = self._fed = 0
        method = self._entry.method
        self._dec: _Decoder
        if method == DEFLATED:
            self._dec = _Inflater()
        elif method == BZIP2:
            self._dec = bz2.BZ2Decompressor()
        else:
            header = self._raw.read_chunk(4)
            header += self._raw.read_chunk(int.from_bytes(header[2:4], "little"))
            self._dec = _lzma_decoder(header)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _account(self, out: bytes) -> bytes:
        self._pos += len(out)
        lim = self._limits
        if self._pos > lim.max_decompressed_size:
            raise LimitExceeded(
                f"decompressed size of {self._entry.name!r}", lim.max_decompressed_size
            )
        consumed = self._fed - (self._dec.unconsumed if isinstance(self._dec, _Inflater) else 0)
        if self._pos > MiB and self._pos > lim.max_compression_ratio * max(consumed, 1):
            raise LimitExceeded(
                f"compression ratio of {self._entry.name!r}", lim.max_compression_ratio
            )
        return out

    def read_chunk(self, n: int) -> bytes:
        n = max(1, min(n, CHUNK))
        try:
            while not self._dec.eof:
                chunk = b""
                if self._dec.needs_input:
                    chunk = self._raw.read_chunk(_INPUT_CHUNK)
                    self._fed += len(chunk)
                    if not chunk:  # input exhausted: drain what the decoder still holds
                        out = (
                            self._dec.decompress(b"", n)
                            if isinstance(self._dec, _Inflater)
                            else b""
                        )
                        return self._account(out)
                out = self._dec.decompress(chunk, n)
                if out:
                    return self._account(out)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
            raise ScanError(f"corrupt compressed data in {self._entry.name!r}: {exc}") from exc
        return b""

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read_chunk(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read_chunk(CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("cannot seek from the end of a compressed member")
        target = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if target < 0:
            raise ValueError("negative seek position")
        if target < self._pos:
            self._restart()
        while self._pos < target and self.read_chunk(target - self._pos):
            pass
        return self._pos


def _raw_stream(f: BinaryIO, entry: ZipEntry, limits: Limits) -> _Window | _Decompressing:
    if entry.data_offset < 0:
        raise ScanError(f"member {entry.name!r} has no readable local header")
    if entry.method == STORED:
        return _Window(f, entry.data_offset, entry.compressed_size, limits)
    if entry.method in _SUPPORTED_METHODS:
        return _Decompressing(f, entry, limits)
    raise ScanError(f"member {entry.name!r} uses unsupported compression method {entry.method}")


def open_member(f: BinaryIO, entry: ZipEntry, limits: Limits = DEFAULT_LIMITS) -> BinaryIO:
    """A buffered, read-only stream of the member's bytes, decompressed within ``limits``.

    Stored members seek cheaply; compressed ones seek by decompressing. Reads raise
    LimitExceeded past the size or ratio caps and ScanError on corrupt data.
    The stream reads ``f`` at absolute offsets, so several may share one file.
    """
    return io.BufferedReader(_raw_stream(f, entry, limits), buffer_size=64 * 1024)


def _crc_of(
    f: BinaryIO, entry: ZipEntry, limits: Limits, cap: int | None = None
) -> tuple[int, int]:
    """CRC-32 and length of the member's bytes (of at most ``cap`` of them)."""
    stream = _raw_stream(f, entry, limits)
    crc = n = 0
    while cap is None or n < cap:
        want = CHUNK if cap is None else min(CHUNK, cap - n)
        chunk = stream.read_chunk(want)
        if not chunk:
            break
        crc, n = zlib.crc32(chunk, crc), n + len(chunk)
    return crc, n


def member_crc_ok(f: BinaryIO, entry: ZipEntry, limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether the member's bytes match its declared CRC (streams the whole member)."""
    return _crc_of(f, entry, limits)[0] == entry.crc
