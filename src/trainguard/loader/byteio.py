"""Reading a loader's input once: the bytes that are checked are the bytes loaded.

``open_source`` turns a path or an open file into a handle; ``read_one_pickle``
cuts exactly one pickle out of a stream; :class:`Pinned` serves the scanned
pickle members of a zip from memory and everything else from the file.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

from trainguard.scanner.picklevm.machine import PickleMachine
from trainguard.scanner.stream import ByteStream


def open_source(f: Any) -> tuple[BinaryIO, bool, str]:
    """(handle, whether we opened it, a name for messages)."""
    if isinstance(f, (str, os.PathLike)):
        return open(f, "rb"), True, os.fspath(f)
    return f, False, str(getattr(f, "name", "<file object>"))


def backing_path(f: Any) -> str | None:
    """The file a path or an open file reads, or None for bytes in memory."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) else None


def whole_file(handle: BinaryIO) -> bytes:
    """Every byte of the open file behind ``handle`` (its position is kept)."""
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return short on some filesystems
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    return data


class _Recorder(io.RawIOBase):
    """Keeps every byte read through it, so one pickle can be cut out of a stream."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.kept = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        buf[: len(data)] = data
        self.kept += data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        line = self.raw.readline(size if size is not None else -1)
        self.kept += line
        return line


def read_one_pickle(f: BinaryIO) -> bytes:
    """Exactly the bytes of the next pickle in ``f`` (position ends after its STOP)."""
    rec = _Recorder(f)
    PickleMachine(ByteStream(rec)).run()  # type: ignore[arg-type]
    return bytes(rec.kept)


class Window(io.RawIOBase):
    """``handle`` seen from ``start`` (torch.load accepts a file positioned mid-way)."""

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        self.h, self.start, self.size, self.pos = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        self.h.seek(self.start + self.pos)
        n = self.h.readinto(buf)  # type: ignore[attr-defined]
        self.pos += n
        return int(n)


class Pinned(Window):
    """Serves the scanned pickle bytes from memory; everything else from the file."""

    def __init__(self, window: Window, pins: dict[int, bytes]) -> None:
        super().__init__(window.h, window.start, window.size)
        self.pins = sorted(pins.items())

    def readinto(self, buf: Any) -> int:
        begin = self.pos
        n = super().readinto(buf)
        view = memoryview(buf).cast("B")
        for off, data in self.pins:
            lo, hi = max(off, begin), min(off + len(data), begin + n)
            if lo < hi:
                view[lo - begin : hi - begin] = data[lo - off : hi - off]
        return n
