"""Zip containers: PyTorch checkpoints, .npz archives and plain zips.

Read with :mod:`trainguard.scanner.ziplenient`, as leniently as PyTorch's own
reader, so that a zip PyTorch loads is never "unreadable" to us.  Every
member is sniffed by content (a pickle named ``config.json`` is still a
pickle); members that are tensor storage are not read beyond their first bytes.
"""

from __future__ import annotations

# Zip names may be cp437; codecs load lazily on first use, so import it now:
# a scan itself never imports anything (tests/test_no_execution.py).
import encodings.cp437  # noqa: F401
import io
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from trainguard.errors import LimitExceeded, ScanError
from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner import ziplenient
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.pickles import scan_pickle_stream, strong_sniff

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


def _finding(
    rule_id: str, message: str, member: str = "", offset: int | None = None, trigger: str = ""
) -> Finding:
    return finding(rule_id, message, member=member, offset=offset, trigger=trigger)


class ZipFlavour(Protocol):
    """A format that is a zip with known members (a Keras ``.keras`` file, ...).

    A flavour whose ``matches`` accepts the member names checks what those
    members mean; every member is still sniffed and scanned by content after.
    """

    name: str

    def matches(self, names: frozenset[str]) -> bool: ...

    def scan(
        self, ctx: ScanContext, blob: Blob, f: BinaryIO, directory: ziplenient.ZipDirectory
    ) -> Iterator[Finding]: ...


class ZipFormat:
    name = "zip"

    def __init__(self, *, prefixed: bool = False, flavours: tuple[ZipFlavour, ...] = ()) -> None:
        # Data in front of a zip (a self-extractor, or an evasion) hides the magic
        # at offset 0 while zipfile still finds the end record. That weaker sniff
        # is registered last, so a pickle carrying a zip's tail stays a pickle.
        self.prefixed = prefixed
        self.flavours = flavours

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if not self.prefixed:
            return head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
        return blob.size is not None and _tail_has_eocd(blob)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as raw:
            try:
                f, size = _random_access(raw, ctx)
            except LimitExceeded as exc:
                yield _finding("TG002", f"zip nested in a compressed stream: {exc}")
                return
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
            yield from anomaly_findings(directory, blob.name)
            for flavour in self.flavours:
                if flavour.matches(frozenset(names)):
                    ctx.formats_seen.append(flavour.name)
                    try:
                        yield from flavour.scan(ctx, blob, f, directory)
                    except (ScanError, OSError) as exc:  # the members are still scanned below
                        yield _finding("TG003", f"{flavour.name} content unreadable: {exc}")
            for entry in directory.entries:
                try:
                    yield from self._member(ctx, blob, f, entry, torch_like)
                except (ScanError, OSError) as exc:  # one bad member must not hide the others
                    member = f"{blob.name}/{entry.name}" if blob.name else entry.name
                    yield _finding("TG003", f"member unreadable: {exc}", member=member)

    def _member(
        self,
        ctx: ScanContext,
        blob: Blob,
        f: BinaryIO,
        entry: ziplenient.ZipEntry,
        torch_like: bool,
    ) -> Iterator[Finding]:
        def opener(entry: ziplenient.ZipEntry = entry) -> BinaryIO:
            return ziplenient.open_member(f, entry, ctx.limits)

        child = blob.child(entry.name, opener, entry.size)
        if torch_like:
            # Inside a PyTorch archive, any pickle (whatever its name: torch.load
            # takes pickle_file=...) resolves storages through persistent ids.
            with opener() as m:
                head = m.read(ctx.limits.sniff_size)
            if is_storage(entry.name) and not strong_sniff(head):
                return  # tensor bytes: not worth parsing without a pickle signature
            if strong_sniff(head) or (entry.name.endswith(".pkl") and head):
                try:
                    yield from _located(
                        scan_pickle_stream(ctx, child, persistent_ids_expected=True), child.name
                    )
                except LimitExceeded as exc:
                    yield _finding("TG206", f"{entry.name}: {exc}", member=child.name)
                return
        yield from ctx.scan_child(child)


def anomaly_findings(directory: ziplenient.ZipDirectory, prefix: str = "") -> Iterator[Finding]:
    """One finding per anomaly the lenient reader saw in ``directory``."""
    for a in directory.anomalies:
        rule_id = _ANOMALY_RULES.get(a.kind, "TG211")
        member = f"{prefix}/{a.member}" if prefix else a.member
        if a.kind == "crc-mismatch":
            msg = f"CRC mismatch in {a.member}: PyTorch loads it, zipfile refuses it"
        else:
            msg = f"zip anomaly ({a.kind}) in {a.member}: {a.detail}"
        yield _finding(rule_id, msg, member=member, offset=a.offset, trigger=a.kind)


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


def is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()


def _random_access(f: BinaryIO, ctx: ScanContext) -> tuple[BinaryIO, int]:
    """``f`` if it can seek from its end (a file, a stored member), else a bounded copy.

    A zip inside a deflated member or a gzip stream can only be read forwards,
    but a zip's directory sits at its end.
    """
    try:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        return f, size
    except (OSError, ValueError):
        pass
    cap = ctx.limits.max_in_memory_member
    data = f.read(cap + 1)
    if len(data) > cap:
        raise LimitExceeded("in-memory copy", cap)
    return io.BytesIO(data), len(data)
