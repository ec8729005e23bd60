"""Zip containers: PyTorch checkpoints, .npz archives and plain zips.

Read with :mod:`trainguard.scan.ziplenient`, as leniently as PyTorch's own
reader, so that a zip PyTorch loads is never "unreadable" to us.  Every
member is sniffed by content (a pickle named ``config.json`` is still a
pickle); members that are tensor storage are not read beyond their first bytes.
"""

from __future__ import annotations

# Zip names may be cp437; codecs load lazily on first use, so import it now:
# a scan itself never imports anything (tests/test_no_execution.py).
import encodings.cp437  # noqa: F401
from collections.abc import Iterator
from typing import BinaryIO

from trainguard.errors import LimitExceeded, ScanError
from trainguard.findings import Finding
from trainguard.rules import RULES
from trainguard.scan import ziplenient
from trainguard.scan.base import Blob, ScanContext
from trainguard.scan.formats.pickles import scan_pickle_stream, strong_sniff

_ANOMALY_RULES = {
    "crc-mismatch": "TG201",
    "name-mismatch": "TG202",
    "local-header-mismatch": "TG202",
    "flag-bits": "TG203",
    "encrypted": "TG203",
    "duplicate-name": "TG204",
    "path-escape": "TG207",
    "symlink": "TG207",
    "name-nul": "TG210",
    "name-encoding": "TG210",
    "ambiguous-central-directory": "TG210",
    "multiple-eocd": "TG210",
    "hidden-entry": "TG210",
    "overlap": "TG210",
    "prepended-data": "TG210",
    "too-many-anomalies": "TG209",
    "unsupported-method": "TG208",
}
# Everything else the reader reports (damaged or odd structure) is TG211.


def _finding(rule_id: str, message: str, member: str = "", offset: int | None = None,
             trigger: str = "") -> Finding:
    return Finding(rule_id, RULES[rule_id].severity, message, member=member, offset=offset,
                   trigger=trigger)


class ZipFormat:
    name = "zip"

    def __init__(self, *, prefixed: bool = False) -> None:
        # Data in front of a zip (a self-extractor, or an evasion) hides the magic
        # at offset 0 while zipfile still finds the end record. That weaker sniff
        # is registered last, so a pickle carrying a zip's tail stays a pickle.
        self.prefixed = prefixed

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if not self.prefixed:
            return head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
        return blob.size is not None and _tail_has_eocd(blob)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            size = blob.size if blob.size is not None else _seek_size(f)
            try:
                directory = ziplenient.read_directory(f, size, ctx.limits)
            except LimitExceeded as exc:
                yield _finding("TG209", f"zip directory: {exc}")
                return
            except ScanError as exc:
                yield _finding("TG003", f"unreadable zip: {exc}")
                return
            names = {e.name for e in directory.entries}
            torch_like = any(n.endswith("data.pkl") for n in names)
            npz_like = bool(names) and all(n.endswith(".npy") for n in names)
            if torch_like or npz_like:
                ctx.formats_seen.append("pytorch" if torch_like else "npz")
            for a in directory.anomalies:
                rule_id = _ANOMALY_RULES.get(a.kind, "TG211")
                member = f"{blob.name}/{a.member}" if blob.name else a.member
                if a.kind == "crc-mismatch":
                    msg = f"CRC mismatch in {a.member}: PyTorch loads it, zipfile refuses it"
                else:
                    msg = f"zip anomaly ({a.kind}) in {a.member}: {a.detail}"
                yield _finding(rule_id, msg, member=member, offset=a.offset, trigger=a.kind)
            for entry in directory.entries:
                try:
                    yield from self._member(ctx, blob, f, entry, torch_like)
                except ScanError as exc:  # one unreadable member must not hide the others
                    member = f"{blob.name}/{entry.name}" if blob.name else entry.name
                    yield _finding("TG003", f"member unreadable: {exc}", member=member)

    def _member(self, ctx: ScanContext, blob: Blob, f: BinaryIO, entry: ziplenient.ZipEntry,
                torch_like: bool) -> Iterator[Finding]:
        def opener(entry: ziplenient.ZipEntry = entry) -> BinaryIO:
            return ziplenient.open_member(f, entry, ctx.limits)

        child = blob.child(entry.name, opener, entry.size)
        if torch_like and entry.name.endswith(".pkl"):
            # PyTorch resolves storages through persistent ids: expected here.
            try:
                yield from _located(scan_pickle_stream(ctx, child, persistent_ids_expected=True),
                                    child.name)
            except LimitExceeded as exc:
                yield _finding("TG206", f"{entry.name}: {exc}", member=child.name)
            return
        if torch_like and _is_storage(entry.name):
            # Tensor bytes: only a strong pickle signature makes them worth parsing.
            try:
                with opener() as m:
                    head = m.read(2)
            except (LimitExceeded, ScanError, OSError):
                return
            if not strong_sniff(head):
                return
        yield from ctx.scan_child(child)


def _located(findings: Iterator[Finding], member: str) -> Iterator[Finding]:
    for f in findings:
        yield f if f.member else f.located(f.file, member)


def _tail_has_eocd(blob: Blob) -> bool:
    assert blob.size is not None
    with blob.open() as f:
        if not f.seekable():
            return False
        start = max(blob.size - 66_000, 0)
        f.seek(start)
        tail = f.read(66_000)
    return ziplenient.looks_like_zip(b"", tail)


def _is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()


def _seek_size(f: BinaryIO) -> int:
    here = f.tell()
    f.seek(0, 2)
    size = f.tell()
    f.seek(here)
    return size
