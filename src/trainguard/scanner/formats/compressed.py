"""Single-stream compression wrappers: gzip, bz2, xz, lzma-alone, lz4 frame, zlib.

joblib compresses whole pickles this way, and users wrap checkpoints in them.
Decompression streams in chunks with a cap on total output and on the ratio
of output to input, so a bomb stops at the cap with a finding (TG206).
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from trainguard.errors import LimitExceeded, MissingExtraError, ScanError
from trainguard.findings import Finding
from trainguard.limits import Limits, MiB
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext

_CHUNK = 1 << 20


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


class DecompressingReader(io.RawIOBase):
    """A bounded read-only stream of the decompressed bytes of ``raw``."""

    def __init__(
        self, raw: BinaryIO, make: Callable[[], _Decompressor], limits: Limits, what: str
    ) -> None:
        self._raw = raw
        self._make = make
        self._d = make()
        self._limits = limits
        self._what = what
        self._pending = b""  # compressed input not yet fed
        self._out = 0
        self._in = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(buf)
        while not self._done:
            if self._d.eof:
                rest = (self._d.unused_data or b"") + self._pending  # lz4 may say None
                if not rest:
                    rest = self._raw.read(_CHUNK)
                    self._in += len(rest)
                if not rest:
                    self._done = True
                    break
                self._d = self._make()  # concatenated members (gzip, bz2, xz allow it)
                self._pending = rest
            needs_input = getattr(self._d, "needs_input", None)
            if needs_input is None:  # zlib keeps what it did not consume in unconsumed_tail
                feed = self._pending or self._read_input()
                data = self._d.decompress(feed, want)
                self._pending = getattr(self._d, "unconsumed_tail", b"")
            else:
                # bz2/lzma/lz4 buffer unconsumed input themselves: feed only when
                # asked, or the buffer would grow by a chunk per small read.
                feed = (self._pending or self._read_input()) if needs_input else b""
                self._pending = b""
                data = self._d.decompress(feed, want)
            if data:
                self._account(len(data))
                buf[: len(data)] = data
                return len(data)
        return 0

    def _read_input(self) -> bytes:
        chunk = self._raw.read(_CHUNK)
        if not chunk:
            raise ScanError(f"{self._what} stream is truncated")
        self._in += len(chunk)
        return chunk

    def _account(self, n: int) -> None:
        self._out += n
        cap = self._limits.max_decompressed_size
        if self._out > cap:
            raise LimitExceeded(f"decompressed {self._what} data", cap)
        if self._out > MiB and self._out > self._limits.max_compression_ratio * max(self._in, 1):
            raise LimitExceeded(
                f"{self._what} compression ratio", self._limits.max_compression_ratio
            )


def _zlib_ok(head: bytes) -> bool:
    if len(head) < 2 or head[0] & 0x0F != 8 or (head[0] << 8 | head[1]) % 31:
        return False
    try:
        zlib.decompressobj().decompress(head[:64], 16)
    except zlib.error:
        return False
    return True


def _lz4() -> _Decompressor:
    try:
        import lz4.frame
    except ImportError as exc:
        raise MissingExtraError("lz4", "lz4", "reading lz4-compressed files") from exc
    return lz4.frame.LZ4FrameDecompressor()  # type: ignore[no-any-return]


_ZF_HEADER = 21  # joblib < 0.10: b"ZF", then the length in hex padded to len(hex(2**64))


def _zfile_ok(head: bytes) -> bool:
    if head[:2] != b"ZF" or len(head) < _ZF_HEADER + 2:
        return False
    try:
        int(head[2:_ZF_HEADER], 16)
    except ValueError:
        return False
    return True


class _ZFile:
    """joblib's old "Z-file" (``numpy_pickle_compat.read_zfile``): a header, then zlib.

    joblib.load still reads it: it skips the header (and one space written by
    joblib <= 0.8.4) and unpickles what zlib gives.
    """

    def __init__(self) -> None:
        self._inner = zlib.decompressobj()
        self._skip: int | None = _ZF_HEADER

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def unused_data(self) -> bytes:
        return self._inner.unused_data

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inner.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._skip is not None:
            if len(data) < self._skip + 1:
                raise ScanError("joblib Z-file header is truncated")
            start = self._skip + (1 if data[self._skip : self._skip + 1] == b" " else 0)
            data, self._skip = data[start:], None
        return self._inner.decompress(data, max_length)


class CompressedFormat:
    def __init__(
        self, name: str, sniff: Callable[[bytes], bool], make: Callable[[], _Decompressor]
    ) -> None:
        self.name = name
        self._sniff = sniff
        self._make = make

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return self._sniff(head)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        try:
            self._make()
        except MissingExtraError as exc:
            yield finding("TG208", str(exc))
            return
        outer = blob

        def opener() -> BinaryIO:
            raw = outer.open()
            return io.BufferedReader(DecompressingReader(raw, self._make, ctx.limits, self.name))

        child = blob.child(f"<{self.name}>", opener, None)
        try:
            yield from ctx.scan_child(child)
        except LimitExceeded as exc:
            yield finding("TG206", str(exc), member=child.name)
        except (ScanError, zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            yield finding(
                "TG003",
                f"{self.name} stream could not be decompressed: {exc}",
                member=child.name,
            )


GZIP = CompressedFormat("gzip", lambda h: h[:2] == b"\x1f\x8b", lambda: zlib.decompressobj(31))
BZIP2 = CompressedFormat(
    "bzip2", lambda h: h[:3] == b"BZh" and h[3:4].isdigit(), bz2.BZ2Decompressor
)
XZ = CompressedFormat(
    "xz", lambda h: h[:6] == b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)
)
LZMA_ALONE = CompressedFormat(
    "lzma",
    lambda h: h[:1] == b"\x5d" and h[1:5] != b"\x00" * 4 and len(h) >= 13,
    lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
)
LZ4 = CompressedFormat("lz4", lambda h: h[:4] == b"\x04\x22\x4d\x18", _lz4)
ZLIB = CompressedFormat("zlib", _zlib_ok, zlib.decompressobj)
JOBLIB_ZFILE = CompressedFormat("joblib-zfile", _zfile_ok, _ZFile)
