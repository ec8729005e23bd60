"""A bounded, position-tracking reader over untrusted bytes.

The pickle machine reads opcodes one at a time and skips over long byte
arguments (tensor data inside a numpy pickle, say) without copying them, so a
2 GB pickle of one array costs a seek, not 2 GB of memory.
"""

from __future__ import annotations

import io
from typing import BinaryIO

_SKIP_CHUNK = 1 << 20


class Truncated(Exception):
    """The data ended before a complete item could be read."""

    def __init__(self, offset: int, wanted: int, got: int) -> None:
        super().__init__(f"data ends at offset {offset + got}: wanted {wanted} bytes, got {got}")
        self.offset = offset


class ByteStream:
    def __init__(self, raw: BinaryIO, *, start: int = 0, size: int | None = None) -> None:
        self._raw = raw
        self._base = start
        self.pos = start
        self.size = size  # total length when known, for cheap bounds checks
        try:
            self._seekable = raw.seekable()
        except (AttributeError, ValueError, OSError):
            self._seekable = False

    @classmethod
    def of_bytes(cls, data: bytes, *, start: int = 0) -> ByteStream:
        return cls(io.BytesIO(data), start=start, size=start + len(data))

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes or :class:`Truncated`."""
        if self.size is not None and self.pos + n > self.size:
            got = self.size - self.pos
            raise Truncated(self.pos, n, max(got, 0))
        data = self._raw.read(n)
        if len(data) != n:
            raise Truncated(self.pos, n, len(data))
        self.pos += n
        return data

    def read_byte(self) -> int | None:
        """The next byte, or None at end of data."""
        b = self._raw.read(1)
        if not b:
            return None
        self.pos += 1
        return b[0]

    def readline(self, limit: int) -> bytes:
        """A newline-terminated line without its newline; bounded by ``limit``."""
        line = self._raw.readline(limit + 1)
        if not line.endswith(b"\n"):
            if len(line) > limit:
                raise Truncated(self.pos, limit, len(line))
            raise Truncated(self.pos, len(line) + 1, len(line))
        self.pos += len(line)
        return line[:-1]

    def skip(self, n: int) -> None:
        if self.size is not None and self.pos + n > self.size:
            raise Truncated(self.pos, n, max(self.size - self.pos, 0))
        if self._seekable:
            self._raw.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        left = n
        while left:
            chunk = self._raw.read(min(left, _SKIP_CHUNK))
            if not chunk:
                raise Truncated(self.pos, left, 0)
            left -= len(chunk)
            self.pos += len(chunk)

    def peek_eof(self) -> bool:
        """True when no byte is left (consumes nothing on seekable streams)."""
        if self.size is not None:
            return self.pos >= self.size
        if self._seekable:
            here = self._raw.tell()
            more = self._raw.read(1)
            self._raw.seek(here)
            return not more
        peek = getattr(self._raw, "peek", None)
        if peek is not None:
            return not peek(1)
        return False

    def read_rest(self, limit: int) -> bytes:
        """Up to ``limit`` remaining bytes (for sniffing what follows a STOP)."""
        data = self._raw.read(limit)
        self.pos += len(data)
        return data
