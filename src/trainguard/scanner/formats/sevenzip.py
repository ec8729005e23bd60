"""7z archives (the nullifAI technique packed PyTorch files with 7z).

Needs the optional ``py7zr`` extra.  Without it, a 7z file is a finding that
says it could not be inspected (TG208), never "clean".  Members are
decompressed in memory one at a time, bounded by their declared size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext

MAGIC = b"7z\xbc\xaf\x27\x1c"


class SevenZipFormat:
    name = "7z"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return head[:6] == MAGIC

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        try:
            import py7zr
        except ImportError:
            yield finding(
                "TG208",
                "7z archive not inspected: install 'trainguard[7z]' (py7zr) to scan "
                "inside it; until then treat it as unsafe",
                trigger="py7zr missing",
            )
            return
        with blob.open() as f:
            try:
                archive = py7zr.SevenZipFile(f, mode="r")
            except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.PasswordRequired) as exc:
                yield finding("TG208", f"7z archive not inspected: {exc}")
                return
            except Exception as exc:  # py7zr raises many types on hostile input
                yield finding("TG003", f"unreadable 7z archive: {exc}")
                return
            with archive:
                yield from self._members(ctx, blob, archive)

    def _members(self, ctx: ScanContext, blob: Blob, archive: Any) -> Iterator[Finding]:
        infos = [i for i in archive.list() if not i.is_directory]
        if len(infos) > ctx.limits.max_archive_members:
            yield finding(
                "TG209",
                f"more than {ctx.limits.max_archive_members} members",
            )
            return
        total = sum(int(i.uncompressed or 0) for i in infos)
        if total > ctx.limits.max_in_memory_member:
            yield finding(
                "TG002",
                f"7z content of {total} bytes exceeds the in-memory limit of "
                f"{ctx.limits.max_in_memory_member}",
            )
            return
        try:
            contents = _read_all(archive)
        except Exception as exc:  # corrupt streams surface as assorted py7zr errors
            yield finding("TG003", f"7z members unreadable: {exc}")
            return
        for name, data in contents.items():
            yield from ctx.scan_child(blob.child(name, _bytes_opener(data), len(data)))


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def _read_all(archive: Any) -> dict[str, bytes]:
    factory = _MemoryFactory()
    archive.extractall(factory=factory)
    return {name: buf.getvalue() for name, buf in factory.files.items()}


class _MemoryFactory:
    """py7zr's WriterFactory protocol, writing members to memory (never to disk)."""

    def __init__(self) -> None:
        self.files: dict[str, io.BytesIO] = {}

    def create(self, filename: str) -> Any:
        buf = io.BytesIO()
        self.files[filename] = buf
        return _MemoryWriter(buf)


class _MemoryWriter:
    def __init__(self, buf: io.BytesIO) -> None:
        self.buf = buf

    def write(self, data: bytes) -> int:
        return self.buf.write(data)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.buf.seek(offset, whence)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def size(self) -> int:
        return len(self.buf.getvalue())
