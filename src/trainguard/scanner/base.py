"""The interface every file format implements, and what the engine gives it.

A new format is one module with a :class:`Format` object, registered in
:mod:`trainguard.scanner.registry`.  Formats never decide verdicts and never
print: they turn bytes into findings, and hand members of containers back to
the engine through :meth:`ScanContext.scan_child`, which sniffs the member by
content and applies depth limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from trainguard.findings import Finding
from trainguard.limits import Limits

Opener = Callable[[], BinaryIO]


@dataclass
class Blob:
    """A piece of data to scan: a file, or a member inside one."""

    name: str  # member path from the top file ("" for the file itself)
    open: Opener
    size: int | None
    depth: int = 0

    def child(self, name: str, opener: Opener, size: int | None) -> Blob:
        full = f"{self.name}/{name}" if self.name else name
        return Blob(full, opener, size, self.depth + 1)


class Format(Protocol):
    name: str

    def sniff(self, head: bytes, blob: Blob) -> bool:
        """True if ``head`` (the first bytes) is this format. Cheap; no full parse."""
        ...

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        """Findings for ``blob``; containers call ``ctx.scan_child`` for members."""
        ...


@dataclass
class ScanContext:
    limits: Limits
    allow: frozenset[str]
    deadline: float | None
    scan_child: Callable[[Blob], Iterator[Finding]]
    scan_nested_bytes: Callable[[bytes, str], list[Finding]]
    # Format names met so far in this file, outermost first; formats may add a
    # more precise label ("pytorch") so reports say what the file really is.
    formats_seen: list[str] = field(default_factory=list)
