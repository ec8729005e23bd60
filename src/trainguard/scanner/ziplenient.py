"""A lenient, bounded zip reader that sees what PyTorch's loader sees.

``torch.load`` reads checkpoints with miniz (PyTorchStreamReader), which accepts
archives that Python's :mod:`zipfile` refuses: bad CRCs, odd flag bits, local
headers whose names differ from the central directory, duplicate names.
Scanners built on :mod:`zipfile` gave up on such files while torch loaded them
(picklescan CVE-2025-10156, CVE-2025-1945, CVE-2025-1944).  This reader accepts
everything either reader accepts (where they would read different central
directories it returns the entries of both), reports each oddity as a
:class:`ZipAnomaly`, and bounds every read: no declared length is trusted before
it is checked against the file size and :class:`~trainguard.limits.Limits`.

Reading the directory touches headers and, to check their CRC, small members
other than torch storages (``CRC_CHECK_MAX_SIZE`` each, ``CRC_CHECK_BUDGET`` in
all), so a 10 GB checkpoint costs a few hundred small reads.  Opening a member
is :mod:`zipmember`'s job; its public names are re-exported here.
"""

from __future__ import annotations

# Names may be cp437, and codecs otherwise load lazily mid-scan; a scan never imports.
import encodings.cp437  # noqa: F401
import re
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from trainguard.errors import LimitExceeded, ScanError
from trainguard.limits import DEFAULT_LIMITS, Limits, MiB
from trainguard.scanner.zipmember import (
    _SUPPORTED_METHODS,
    CHUNK,
    STORED,
    ZipEntry,
    _crc_of,
    member_crc_ok,
    open_member,
)

__all__ = [
    "STORED",
    "ZipAnomaly",
    "ZipDirectory",
    "ZipEntry",
    "looks_like_zip",
    "member_crc_ok",
    "open_member",
    "read_directory",
]

MAX_ANOMALIES = 10_000  # a hostile archive could otherwise make the report itself huge
MAX_EOCD_CANDIDATES = 1_000  # end records tried, newest first, inside the comment scan
MAX_EARLIER_EOCD = 16  # usable end records before the chosen one, kept to report
MAX_DESCRIPTOR_PROBES = 1_000_000  # data-descriptor signatures tried when walking local headers
CRC_CHECK_MAX_SIZE = 1 * MiB  # members this small are CRC-checked by read_directory
CRC_CHECK_BUDGET = 8 * MiB  # ...until this many member bytes have been read in total
# torch storages are the bulk of a checkpoint and are read as raw numbers, never
# unpickled: read_directory leaves their bytes alone.
_TORCH_STORAGE = re.compile(r"(?:^|/)data/\d+\Z")

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_EOCD64_SIG = b"PK\x06\x06"
_LOCATOR_SIG = b"PK\x06\x07"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_U32 = 0xFFFFFFFF

_FLAG_ENCRYPTED = 0x0001
_FLAG_DESCRIPTOR = 0x0008
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_MASKED_HEADER = 0x2000
_ENCRYPTION_FLAGS = _FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_HEADER
_EXPECTED_FLAGS = _FLAG_DESCRIPTOR | _FLAG_UTF8
# Bits 1-2 carry the compression level for deflate and the end-marker for
# LZMA; `zip -9` sets them, so they are ordinary there.
_LEVEL_FLAGS = 0x0006
_LEVEL_METHODS = frozenset({8, 9, 14})


@dataclass(frozen=True)
class ZipAnomaly:
    """Something a strict reader would refuse, or where two readers may disagree.

    Kinds: where readers disagree or refuse: crc-mismatch, flag-bits, encrypted,
    name-mismatch, local-header-mismatch, duplicate-name, name-nul, name-encoding,
    ambiguous-central-directory, multiple-eocd, hidden-entry, overlap.
    Dangerous on extraction: path-escape, symlink.  Damaged or odd structure:
    bad-eocd, bad-central-directory, no-central-directory, entry-count-mismatch,
    bad-local-header, bad-zip64-extra, out-of-bounds, size-mismatch, truncated,
    unsupported-method, bad-compressed-data, prepended-data, unreferenced-data,
    trailing-data, too-many-anomalies.
    """

    kind: str
    member: str
    offset: int
    detail: str


@dataclass
class ZipDirectory:
    """What :func:`read_directory` found: entries in central-directory order."""

    entries: list[ZipEntry]
    anomalies: list[ZipAnomaly]
    comment: bytes = b""
    crc_checked: frozenset[int] = frozenset()  # indices into entries whose CRC was verified


class _Anomalies:
    def __init__(self) -> None:
        self.items: list[ZipAnomaly] = []

    def add(self, kind: str, member: str, offset: int, detail: str) -> None:
        if len(self.items) < MAX_ANOMALIES:
            self.items.append(ZipAnomaly(kind, member, offset, detail))
        elif len(self.items) == MAX_ANOMALIES:
            self.items.append(ZipAnomaly("too-many-anomalies", "", offset, "later ones dropped"))


class _Source:
    """Positioned reads that never go past ``size`` and never trust ``f``'s position."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or n <= 0 or offset >= self.size:
            return b""
        n = min(n, self.size - offset)
        self.f.seek(offset)
        parts: list[bytes] = []
        while n > 0:
            part = self.f.read(n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


class _Cursor:
    """Sequential reads through [start, end), refilled one CHUNK at a time."""

    def __init__(self, src: _Source, start: int, end: int) -> None:
        self.src, self.pos, self.end = src, start, end
        self.buf, self.buf_start = b"", start

    def take(self, n: int) -> bytes | None:
        if self.pos + n > self.end:
            return None
        off = self.pos - self.buf_start
        if off + n > len(self.buf):
            self.buf = self.src.read_at(self.pos, min(max(n, CHUNK), self.end - self.pos))
            self.buf_start, off = self.pos, 0
            if len(self.buf) < n:
                return None
        self.pos += n
        return self.buf[off : off + n]


class _Local(NamedTuple):
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    raw_name: bytes
    data_offset: int


class _Central(NamedTuple):
    sig: bytes
    made_by: int
    needed: int
    flags: int
    method: int
    time: int
    date: int
    crc: int
    compressed_size: int
    size: int
    name_len: int
    extra_len: int
    comment_len: int
    disk: int
    internal_attr: int
    external_attr: int
    header_offset: int


class _View(NamedTuple):
    """Where one reader believes the central directory is."""

    reader: str
    cd_offset: int
    cd_size: int
    entries: int
    shift: int  # added to every header offset (zipfile's allowance for prepended data)


def _extra_field(extra: bytes, wanted: int) -> bytes | None:
    pos = 0
    while pos + 4 <= len(extra):
        hid, hlen = struct.unpack_from("<HH", extra, pos)
        if hid == wanted:
            return extra[pos + 4 : pos + 4 + hlen]
        pos += 4 + hlen
    return None


def _zip64_values(extra: bytes, values: tuple[int, ...]) -> tuple[int, ...] | None:
    """Replace each 0xFFFFFFFF in ``values`` from the ZIP64 extra field, in order."""
    if _U32 not in values:
        return values
    body = _extra_field(extra, 0x0001)
    if body is None:
        return None
    out, pos = list(values), 0
    for i, value in enumerate(values):
        if value == _U32:
            if pos + 8 > len(body):
                return None
            out[i] = struct.unpack_from("<Q", body, pos)[0]
            pos += 8
    return tuple(out)


def _decode_name(raw: bytes, flags: int) -> tuple[str, bool]:
    if flags & _FLAG_UTF8:
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace"), False
    return raw.decode("cp437"), True


def _read_local(src: _Source, offset: int) -> _Local | str:
    """The local header at ``offset``, or why there is none."""
    head = src.read_at(offset, _LOCAL.size)
    if len(head) < _LOCAL.size:
        return "local header lies past the end of the file"
    sig, _ver, flags, method, _t, _d, crc, csize, usize, nlen, xlen = _LOCAL.unpack(head)
    if sig != _LOCAL_SIG:
        return f"no local header signature at {offset} (found {sig!r})"
    rest = src.read_at(offset + _LOCAL.size, nlen + xlen)
    if len(rest) < nlen + xlen:
        return "local header name or extra field runs past the end of the file"
    sizes = _zip64_values(rest[nlen:], (usize, csize))
    if sizes is None:
        sizes = (usize, csize)
    data_offset = offset + _LOCAL.size + nlen + xlen
    return _Local(flags, method, crc, sizes[1], sizes[0], rest[:nlen], data_offset)


def _escape_reason(name: str) -> str | None:
    if name.startswith(("/", "\\")):
        return "absolute path"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "parent-directory component"
    return None


def _check_entry(e: ZipEntry, local_flags: int, rep: _Anomalies, seen: set[str]) -> None:
    """Anomalies visible from the entry alone (both the central and the local view)."""
    flags = e.flags | local_flags
    allowed = _EXPECTED_FLAGS | (_LEVEL_FLAGS if e.method in _LEVEL_METHODS else 0)
    if flags & ~allowed:
        rep.add(
            "flag-bits", e.name, e.header_offset, f"unexpected flag bits {flags & ~allowed:#06x}"
        )
    if flags & _ENCRYPTION_FLAGS:
        rep.add(
            "encrypted",
            e.name,
            e.header_offset,
            "marked encrypted; read as stored bytes anyway",
        )
    if e.method not in _SUPPORTED_METHODS:
        rep.add("unsupported-method", e.name, e.header_offset, f"compression method {e.method}")
    if e.method == STORED and e.compressed_size != e.size:
        rep.add(
            "size-mismatch",
            e.name,
            e.header_offset,
            f"stored member: compressed size {e.compressed_size} != size {e.size}",
        )
    for name in dict.fromkeys((e.name, e.local_name)):
        reason = _escape_reason(name)
        if reason:
            rep.add("path-escape", name, e.header_offset, reason)
        if "\x00" in name:
            rep.add("name-nul", name, e.header_offset, "zipfile cuts the name at the NUL byte")
    if stat.S_ISLNK(e.external_attr >> 16):
        rep.add("symlink", e.name, e.header_offset, "unix mode says symbolic link")
    if e.name in seen:
        rep.add("duplicate-name", e.name, e.header_offset, "name already used by another entry")
    seen.add(e.name)


def _compare_local(e: ZipEntry, raw_name: bytes, loc: _Local, rep: _Anomalies) -> None:
    if loc.raw_name != raw_name:
        rep.add("name-mismatch", e.name, e.header_offset, f"local header: {e.local_name!r}")
    diffs = [
        f for f, a, b in (("method", e.method, loc.method), ("flags", e.flags, loc.flags)) if a != b
    ]
    if not (e.flags | loc.flags) & _FLAG_DESCRIPTOR:
        diffs += [
            f
            for f, a, b in (
                ("crc", e.crc, loc.crc),
                ("size", e.size, loc.size),
                ("compressed size", e.compressed_size, loc.compressed_size),
            )
            if a != b
        ]
    if diffs:
        rep.add(
            "local-header-mismatch",
            e.name,
            e.header_offset,
            "local header differs in " + ", ".join(diffs),
        )


def looks_like_zip(head: bytes, tail: bytes) -> bool:
    """Cheap sniff: a local header (or a spanning marker before one) at 0, or an end record."""
    return (
        head.startswith((_LOCAL_SIG, _EOCD_SIG, _DESCRIPTOR_SIG + _LOCAL_SIG)) or _EOCD_SIG in tail
    )


def _eocd_candidates(src: _Source, limits: Limits) -> list[int]:
    scan = min(src.size, max(limits.max_zip_comment_scan, _EOCD.size))
    start = src.size - scan
    tail = src.read_at(start, scan)
    found: list[int] = []
    i = tail.rfind(_EOCD_SIG)
    while i >= 0 and len(found) < MAX_EOCD_CANDIDATES:
        if len(tail) - i >= _EOCD.size:
            found.append(start + i)
        i = tail.rfind(_EOCD_SIG, 0, i)  # the signature cannot overlap itself
    return found


def _zip64_record(src: _Source, offset: int) -> tuple[int, int, int] | None:
    rec = src.read_at(offset, _EOCD64.size)
    if len(rec) < _EOCD64.size or rec[:4] != _EOCD64_SIG:
        return None
    _sig, _size, _made, _need, _disk, _cd_disk, _n_disk, count, cd_size, cd_offset = _EOCD64.unpack(
        rec
    )
    return count, cd_size, cd_offset


def _views(src: _Source, eocd: int) -> tuple[list[_View], list[tuple[int, int]], bytes]:
    """The central directories miniz and zipfile would read, the spans of the end
    records, and the archive comment."""
    _sig, _disk, _cd_disk, _n_disk, count, cd_size, cd_offset, clen = _EOCD.unpack(
        src.read_at(eocd, _EOCD.size)
    )
    comment = src.read_at(eocd + _EOCD.size, clen)
    spans = [(eocd, eocd + _EOCD.size + len(comment))]
    miniz = zipf = (count, cd_size, cd_offset)
    end_of_cd = eocd  # where zipfile expects the central directory to end
    loc_at = eocd - _LOCATOR.size
    locator = src.read_at(loc_at, _LOCATOR.size)
    if loc_at >= 0 and len(locator) == _LOCATOR.size and locator[:4] == _LOCATOR_SIG:
        spans.append((loc_at, eocd))
        rec_offset = _LOCATOR.unpack(locator)[2]
        # miniz follows the locator; zipfile reads the record just before it.
        by_locator = _zip64_record(src, rec_offset)
        before = _zip64_record(src, loc_at - _EOCD64.size)
        if by_locator:
            miniz = by_locator
            spans.append((rec_offset, rec_offset + _EOCD64.size))
        if before:
            zipf = before
            end_of_cd = loc_at - _EOCD64.size
            spans.append((end_of_cd, loc_at))
    views = [_View("miniz", miniz[2], miniz[1], miniz[0], 0)]
    shift = end_of_cd - zipf[1] - zipf[2]
    if shift >= 0:
        views.append(_View("zipfile", zipf[2] + shift, zipf[1], zipf[0], shift))
    unique = {(v.cd_offset, v.cd_size, v.shift): v for v in reversed(views)}
    return list(reversed(unique.values())), spans, comment


def _view_readable(src: _Source, v: _View) -> bool:
    if v.entries == 0 and v.cd_size == 0:
        return True
    return src.read_at(v.cd_offset, 4) == _CENTRAL_SIG


def _parse_central(
    src: _Source, v: _View, limits: Limits, rep: _Anomalies
) -> list[tuple[ZipEntry, int]]:
    """Entries of one central directory, each with its local header's flags."""
    if v.entries > limits.max_archive_members:
        raise LimitExceeded("zip entry count", limits.max_archive_members)
    if v.cd_offset + v.cd_size > src.size:
        rep.add("out-of-bounds", "", v.cd_offset, f"{v.reader}: directory runs past the end")
    cur = _Cursor(src, v.cd_offset, min(v.cd_offset + v.cd_size, src.size))
    out: list[tuple[ZipEntry, int]] = []
    # Walk by bytes as zipfile does (miniz walks by count): whichever sees more wins.
    while cur.pos < cur.end:
        at = cur.pos
        fixed = cur.take(_CENTRAL.size)
        if fixed is None or fixed[:4] != _CENTRAL_SIG:
            rep.add("bad-central-directory", "", at, f"{v.reader}: no central header here")
            break
        h = _Central._make(_CENTRAL.unpack(fixed))
        raw_name, extra, comment = (
            cur.take(h.name_len),
            cur.take(h.extra_len),
            cur.take(h.comment_len),
        )
        if raw_name is None or extra is None or comment is None:
            rep.add("bad-central-directory", "", at, f"{v.reader}: header runs past its end")
            break
        if len(out) >= limits.max_archive_members:
            raise LimitExceeded("zip entry count", limits.max_archive_members)
        out.append(_central_entry(src, v, h, raw_name, extra, rep))
    if len(out) != v.entries:
        detail = f"{v.reader}: end record declares {v.entries} entries, found {len(out)}"
        rep.add("entry-count-mismatch", "", v.cd_offset, detail)
    return out


def _central_entry(
    src: _Source, v: _View, h: _Central, raw_name: bytes, extra: bytes, rep: _Anomalies
) -> tuple[ZipEntry, int]:
    name, name_ok = _decode_name(raw_name, h.flags)
    if not name_ok:
        rep.add("name-encoding", name, h.header_offset, "flag bit 11 set, name is not UTF-8")
    unicode_path = _extra_field(extra, 0x7075)  # Info-ZIP's; 7-Zip and unzip prefer it
    if unicode_path and unicode_path[5:].decode("utf-8", "replace") != name:
        detail = f"Unicode Path extra field names it {unicode_path[5:]!r}"
        rep.add("name-mismatch", name, h.header_offset, detail)
    values = _zip64_values(extra, (h.size, h.compressed_size, h.header_offset))
    if values is None:
        rep.add("bad-zip64-extra", name, h.header_offset, "ZIP64 extra field is too short")
        values = (h.size, h.compressed_size, h.header_offset)
    size, csize, hoff = values[0], values[1], values[2] + v.shift
    local = _read_local(src, hoff)
    if isinstance(local, str):
        rep.add("out-of-bounds" if hoff >= src.size else "bad-local-header", name, hoff, local)
        return ZipEntry(
            name, "", hoff, -1, csize, size, h.crc, h.method, h.flags, h.external_attr
        ), 0
    local_name, _ = _decode_name(local.raw_name, local.flags)
    entry = ZipEntry(
        name,
        local_name,
        hoff,
        local.data_offset,
        csize,
        size,
        h.crc,
        h.method,
        h.flags,
        h.external_attr,
    )
    _compare_local(entry, raw_name, local, rep)
    if local.data_offset + csize > src.size:
        rep.add("out-of-bounds", name, hoff, "member data runs past the end of the file")
    return entry, local.flags


def _find_descriptor(
    src: _Source, data_offset: int, probes: list[int]
) -> tuple[int, int, int, int] | None:
    """For a streamed member: (crc, compressed size, size, descriptor length) of the
    first signed data descriptor whose size matches its position.  ``probes`` counts
    the signatures examined, across the whole walk."""
    pos = data_offset
    while pos < src.size:
        block = src.read_at(pos, CHUNK + 24)
        padded = block + bytes(24)
        i = block.find(_DESCRIPTOR_SIG)
        while 0 <= i < CHUNK:
            probes[0] += 1
            if probes[0] > MAX_DESCRIPTOR_PROBES:
                raise LimitExceeded("data descriptor signatures examined", MAX_DESCRIPTOR_PROBES)
            dist = pos + i - data_offset
            crc, c32, u32 = struct.unpack_from("<III", padded, i + 4)
            if c32 == dist & _U32:
                return crc, dist, u32, 16
            crc, c64, u64 = struct.unpack_from("<IQQ", padded, i + 4)
            if c64 == dist:
                return crc, dist, u64, 24
            i = block.find(_DESCRIPTOR_SIG, i + 1)
        pos += CHUNK
    return None


def _walk_local(src: _Source, limits: Limits, rep: _Anomalies) -> list[tuple[ZipEntry, int]]:
    """Fallback without a central directory: follow the local headers from offset 0."""
    out: list[tuple[ZipEntry, int]] = []
    pos, probes = 0, [0]
    while pos < src.size and src.read_at(pos, 4) == _LOCAL_SIG:
        if len(out) >= limits.max_archive_members:
            raise LimitExceeded("zip entry count", limits.max_archive_members)
        local = _read_local(src, pos)
        if isinstance(local, str):
            rep.add("bad-local-header", "", pos, local)
            break
        name, _ = _decode_name(local.raw_name, local.flags)
        crc, csize, usize, tail = local.crc, local.compressed_size, local.size, 0
        if local.flags & _FLAG_DESCRIPTOR and csize == 0:
            found = _find_descriptor(src, local.data_offset, probes)
            if found is None:
                rep.add("truncated", name, pos, "streamed member without a findable descriptor")
                csize = src.size - local.data_offset
            else:
                crc, csize, usize, tail = found
        entry = ZipEntry(
            name, name, pos, local.data_offset, csize, usize, crc, local.method, local.flags, 0
        )
        out.append((entry, local.flags))
        if local.data_offset + csize > src.size:
            rep.add("out-of-bounds", name, pos, "member data runs past the end of the file")
            break
        pos = local.data_offset + csize + tail
    return out


def _layout(
    src: _Source, entries: list[ZipEntry], spans: list[tuple[int, int]], rep: _Anomalies
) -> None:
    """Overlapping members (zip bombs, two names for one payload) and bytes no entry
    claims (hidden local entries that a streaming reader would see)."""
    items = [
        (
            e.header_offset,
            e.data_offset + e.compressed_size if e.data_offset >= 0 else e.header_offset + 30,
            e.name,
            e.flags,
        )
        for e in entries
    ]
    items += [(a, b, "<zip structure>", 0) for a, b in set(spans)]
    items.sort()
    reach, last_flags, last_name = 0, 0, ""
    for start, end, name, flags in items:
        if start < reach:
            rep.add("overlap", name, start, f"overlaps {last_name!r}, which ends at {reach}")
        elif start > reach and not (last_flags & _FLAG_DESCRIPTOR and start - reach <= 24):
            kind = "prepended-data" if reach == 0 else "unreferenced-data"
            if src.read_at(reach, 4) == _LOCAL_SIG:
                kind = "hidden-entry"
            rep.add(kind, "", reach, f"{start - reach} bytes no entry refers to")
        if end > reach:
            reach, last_flags, last_name = end, flags, name
    if reach < src.size:
        rep.add("trailing-data", "", reach, f"{src.size - reach} bytes after the end record")


def _check_crcs(
    f: BinaryIO, entries: list[ZipEntry], limits: Limits, rep: _Anomalies
) -> frozenset[int]:
    checked: set[int] = set()
    budget = CRC_CHECK_BUDGET
    for i, e in enumerate(entries):
        small = max(e.compressed_size, e.size) <= min(CRC_CHECK_MAX_SIZE, budget)
        if (
            not small
            or e.data_offset < 0
            or e.method not in _SUPPORTED_METHODS
            or e.flags & _ENCRYPTION_FLAGS
            or _TORCH_STORAGE.search(e.name)
        ):
            continue
        budget -= max(e.compressed_size, e.size)
        try:
            crc, n = _crc_of(f, e, limits, cap=e.size + 1)
        except ScanError as exc:
            rep.add("bad-compressed-data", e.name, e.data_offset, str(exc))
            continue
        checked.add(i)
        if n != e.size:
            found = "more than " + str(e.size) if n > e.size else str(n)
            rep.add(
                "size-mismatch",
                e.name,
                e.data_offset,
                f"declared size {e.size}, data holds {found} bytes",
            )
        elif crc != e.crc:
            rep.add(
                "crc-mismatch",
                e.name,
                e.data_offset,
                f"declared CRC {e.crc:#010x}, data has {crc:#010x}",
            )
    return frozenset(checked)


class _End(NamedTuple):
    offset: int
    views: list[_View]  # only those that point at a central directory
    spans: list[tuple[int, int]]
    comment: bytes


def _find_end(src: _Source, limits: Limits, rep: _Anomalies) -> tuple[_End | None, list[int]]:
    """The last usable end record (both miniz and zipfile take the last one) and
    a few usable ones before it, which other readers might take instead."""
    candidates = _eocd_candidates(src, limits)
    chosen: _End | None = None
    earlier: list[int] = []
    for eocd in candidates:
        views, spans, comment = _views(src, eocd)
        usable = [v for v in views if _view_readable(src, v)]
        if not usable:
            continue
        if chosen is not None:
            earlier.append(eocd)
            if len(earlier) >= MAX_EARLIER_EOCD:
                break
            continue
        chosen = _End(eocd, usable, spans, comment)
        if eocd != candidates[0]:
            rep.add("bad-eocd", "", candidates[0], "the last end record points at nothing")
    if chosen is None and candidates:
        rep.add("bad-eocd", "", candidates[0], "no end record points at a central directory")
    return chosen, earlier


def _read_central(
    src: _Source, end: _End, limits: Limits, rep: _Anomalies
) -> list[tuple[ZipEntry, int]]:
    """Entries of every readable view, each once, with their local header's flags."""
    per_view = [_parse_central(src, v, limits, rep) for v in end.views]
    found: dict[ZipEntry, int] = {}
    for parsed in per_view:
        for entry, local_flags in parsed:
            found.setdefault(entry, local_flags)
    if len(found) > limits.max_archive_members:
        raise LimitExceeded("zip entry count", limits.max_archive_members)
    if len(per_view) == 2 and [p[0] for p in per_view[0]] != [p[0] for p in per_view[1]]:
        rep.add(
            "ambiguous-central-directory",
            "",
            end.views[1].cd_offset,
            "torch (miniz) and zipfile read different central directories",
        )
    return list(found.items())


def read_directory(f: BinaryIO, size: int, limits: Limits = DEFAULT_LIMITS) -> ZipDirectory:
    """Read the directory of the zip in ``f`` (``size`` bytes), reporting every anomaly.

    Raises ScanError when no zip structure is readable at all, LimitExceeded when
    the archive declares or holds more than ``limits.max_archive_members`` entries.
    """
    src, rep = _Source(f, size), _Anomalies()
    end, earlier = _find_end(src, limits, rep)
    found: list[tuple[ZipEntry, int]] = []
    spans: list[tuple[int, int]] = []
    if end is not None:
        found = _read_central(src, end, limits, rep)
        spans = end.spans + [(v.cd_offset, v.cd_offset + v.cd_size) for v in end.views]
    if not found and (end is None or any(v.entries for v in end.views)):
        if src.read_at(0, 4) != _LOCAL_SIG:
            what = "no usable end record" if end is None else "an unreadable central directory"
            raise ScanError(f"not a zip: {what} and no local header at offset 0")
        rep.add("no-central-directory", "", 0, "entries recovered by walking local headers")
        found = _walk_local(src, limits, rep)
    seen: set[str] = set()
    for entry, local_flags in found:
        _check_entry(entry, local_flags, rep, seen)
    entries = [e for e, _ in found]
    for eocd in earlier:
        if not any(e.data_offset <= eocd < e.data_offset + e.compressed_size for e in entries):
            rep.add("multiple-eocd", "", eocd, "another usable end record lies earlier")
    _layout(src, entries, spans, rep)
    checked = _check_crcs(f, entries, limits, rep)
    return ZipDirectory(entries, rep.items, end.comment if end else b"", checked)
