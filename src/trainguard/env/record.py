"""Installed distributions and what their RECORD files promise.

Distributions are enumerated with :mod:`importlib.metadata`, which reads their
metadata files and never imports their code.  A RECORD row names a file
(relative to the folder that holds the ``.dist-info``), its hash and size; the
hash is the only independent statement of what the file should contain.
Distributions without RECORD (Debian's apt packages, old ``egg-info``) cannot
be verified; they are kept, with the top-level names they claim, so that their
files are reported as unverifiable rather than as unknown additions.
"""

from __future__ import annotations

import binascii
import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from trainguard.filestate import Identity
from trainguard.findings import Finding
from trainguard.rules import rule

# PEP 376 and the wheel spec forbid these for RECORD; a RECORD that uses one
# could have been rewritten to a hash that is cheap to collide.
WEAK_ALGORITHMS = frozenset({"md5", "sha1"})
# A RECORD is metadata written by an installer; torch's is ~2 MB.
MAX_RECORD_BYTES = 64 * 1024 * 1024


class RecordEntry(NamedTuple):
    """One RECORD row: ``path`` is absolute and normalised.

    (A named tuple: torch alone has 15,000 rows, and a frozen dataclass is
    several times slower to build.)
    """

    path: str
    algorithm: str | None
    digest: bytes | None
    size: int | None


@dataclass
class InstalledDist:
    name: str
    version: str
    meta_dir: str
    root: str
    has_record: bool
    entries: list[RecordEntry] = field(default_factory=list)
    # Findings about the metadata itself (malformed rows, weak hashes).
    problems: list[Finding] = field(default_factory=list)
    # Without RECORD: the paths (files or folders) its top_level.txt or
    # installed-files.txt claim, so their files are not called unlisted.
    claims: list[str] = field(default_factory=list)
    # For an editable install, the source folder its .pth points at: set only
    # when RECORD lists nothing in the site folder but what such an install
    # writes (see :func:`only_editable_files`).
    editable: str | None = None
    # What direct_url.json claims (a source folder), whether or not believed:
    # the file is as writable as any other in site-packages.
    claims_editable: str | None = None
    # The stat of the RECORD that was read (not of whatever is there now).
    record_key: Identity | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def _finding(rule_id: str, message: str, file: str, **evidence: str) -> Finding:
    return Finding(
        rule=rule_id,
        severity=rule(rule_id).severity,
        message=message,
        file=file,
        evidence=dict(evidence),
    )


_DIGEST_SIZES: dict[str, int] = {}
_URLSAFE = str.maketrans("-_", "+/")
if sys.version_info >= (3, 11):

    def _a2b(text: str) -> bytes:
        return binascii.a2b_base64(text, strict_mode=True)

else:  # pragma: no cover - 3.10 has no strict mode; the length check still applies

    def _a2b(text: str) -> bytes:
        return binascii.a2b_base64(text)


def _joined(root: str, prefix: str, name: str) -> str:
    # normpath is most of the cost of reading torch's 15,000 rows; plain
    # relative names (all but a few) are already normal.
    if (
        name.startswith(("/", "."))
        or "/." in name
        or "//" in name
        or "\\" in name
        or (not name or name.endswith("/"))
    ):
        return os.path.normpath(os.path.join(root, name))
    return prefix + (name if os.sep == "/" else name.replace("/", os.sep))


def parse_hash(text: str) -> tuple[str, bytes]:
    """``sha256=<urlsafe base64 without padding>`` -> (algorithm, raw digest)."""
    algorithm, sep, encoded = text.partition("=")
    if algorithm not in _DIGEST_SIZES:
        algorithm = algorithm.strip().lower()
    if not sep or not algorithm or not encoded:
        raise ValueError(f"hash {text!r} is not ALGORITHM=DIGEST")
    if algorithm not in hashlib.algorithms_guaranteed:
        raise ValueError(f"hash algorithm {algorithm!r} is unknown")
    try:
        # binascii straight away: base64.urlsafe_b64decode's wrapping is most
        # of the cost of reading a torch RECORD.
        padded = encoded.translate(_URLSAFE) + "=" * (-len(encoded) % 4)
        digest = _a2b(padded)
    except (binascii.Error, ValueError):
        raise ValueError(f"hash {text!r} is not urlsafe base64") from None
    size = _DIGEST_SIZES.get(algorithm)
    if size is None:
        size = _DIGEST_SIZES[algorithm] = hashlib.new(algorithm).digest_size
    if len(digest) != size:
        raise ValueError(f"{algorithm} digest has {len(digest)} bytes")
    return algorithm, digest


def parse_record(text: str, root: str, record_path: str) -> tuple[list[RecordEntry], list[Finding]]:
    """Rows of a RECORD file, and a finding for each row that cannot be used."""
    entries: list[RecordEntry] = []
    problems: list[Finding] = []
    prefix = os.path.join(root, "")
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row:
            continue  # a blank line
        if len(row) != 3:
            problems.append(
                _finding(
                    "TG614",
                    f"RECORD line {number} has {len(row)} fields, not 3",
                    record_path,
                    line=str(number),
                )
            )
            continue
        name, hash_text, size_text = row
        path = _joined(root, prefix, name)
        algorithm: str | None = None
        digest: bytes | None = None
        size: int | None = None
        if hash_text:
            try:
                algorithm, digest = parse_hash(hash_text)
            except ValueError as exc:
                problems.append(
                    _finding(
                        "TG614",
                        f"RECORD line {number}: {exc}",
                        record_path,
                        line=str(number),
                        path=path,
                    )
                )
                entries.append(RecordEntry(path, None, None, None))
                continue
            if algorithm in WEAK_ALGORITHMS:
                problems.append(
                    _finding(
                        "TG614",
                        f"RECORD line {number} uses the weak hash {algorithm}, which "
                        "the wheel specification forbids",
                        record_path,
                        line=str(number),
                        path=path,
                        algorithm=algorithm,
                    )
                )
        if size_text:
            try:
                size = int(size_text)
            except ValueError:
                problems.append(
                    _finding(
                        "TG614",
                        f"RECORD line {number}: size {size_text!r} is not a number",
                        record_path,
                        line=str(number),
                        path=path,
                    )
                )
        entries.append(RecordEntry(path, algorithm, digest, size))
    return entries, problems


def _meta_dir(dist: metadata.Distribution) -> str | None:
    # PathDistribution keeps its folder in a private attribute; every
    # distribution the path finder yields is one.
    path = getattr(dist, "_path", None)
    return os.fspath(path) if isinstance(path, Path) else None


def _editable_target(dist: metadata.Distribution) -> str | None:
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    dir_info = info.get("dir_info")
    if not isinstance(dir_info, dict) or not dir_info.get("editable"):
        return None
    url = info.get("url")
    if isinstance(url, str) and url.startswith("file://"):
        return url[len("file://") :]
    return str(url)


def only_editable_files(dist: InstalledDist) -> bool:
    """True when RECORD lists, in the site folder, only the files an editable install
    writes there: its metadata, ``.pth`` files and ``__editable__*`` finders (with
    their compiled caches).  Launchers outside the site folder do not count."""
    meta = os.path.join(dist.meta_dir, "")
    root = os.path.join(dist.root, "")
    for entry in dist.entries:
        path = os.path.normpath(entry.path)
        if path.startswith(meta) or not path.startswith(root):
            continue
        parts = path[len(root) :].split(os.sep)
        if len(parts) == 2 and parts[0] == "__pycache__":
            parts = parts[1:]
        name = parts[-1]
        finder = name.startswith("__editable__") and name.endswith((".py", ".pyc"))
        if len(parts) != 1 or not (name.endswith(".pth") or finder):
            return False
    return True


def _claims_without_record(dist: metadata.Distribution, root: str, meta_dir: str) -> list[str]:
    claims = [meta_dir]
    installed = dist.read_text("installed-files.txt")
    if installed:
        for line in installed.splitlines():
            if line.strip():
                claims.append(os.path.normpath(os.path.join(meta_dir, line.strip())))
    top_level = dist.read_text("top_level.txt") or ""
    for name in top_level.split():
        base = os.path.join(root, name.replace("/", os.sep))
        claims.append(base)  # a package folder
        claims.append(base + ".py")
    return claims


def _name_version(dist: metadata.Distribution, meta_dir: str) -> tuple[str, str]:
    # A .dist-info folder is named NAME-VERSION with both parts escaped so
    # that neither holds a dash; reading the name there saves parsing every
    # METADATA file (a tenth of a re-verify of a torch environment).
    folder = os.path.basename(meta_dir)
    stem = folder[: -len(".dist-info")] if folder.endswith(".dist-info") else ""
    if stem.count("-") == 1:
        name, version = stem.split("-")
        if name and version:
            return name, version
    meta = dist.metadata
    return meta["Name"] or folder.split("-")[0], meta["Version"] or "?"


def load_dist(dist: metadata.Distribution, root: str) -> InstalledDist | None:
    meta_dir = _meta_dir(dist)
    if meta_dir is None:
        return None
    name, version = _name_version(dist, meta_dir)
    record_path = os.path.join(meta_dir, "RECORD")
    installed = InstalledDist(
        name=name,
        version=version,
        meta_dir=meta_dir,
        root=root,
        has_record=os.path.isfile(record_path),
        claims_editable=_editable_target(dist),
    )
    if not installed.has_record:
        installed.claims = _claims_without_record(dist, root, meta_dir)
        return installed
    try:
        if os.path.getsize(record_path) > MAX_RECORD_BYTES:
            raise OSError(f"larger than {MAX_RECORD_BYTES} bytes")
        with open(record_path, encoding="utf-8", newline="") as fh:
            installed.record_key = Identity.of(os.fstat(fh.fileno()))
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        installed.problems.append(_finding("TG614", f"RECORD cannot be read: {exc}", record_path))
        return installed
    installed.entries, installed.problems = parse_record(text, root, record_path)
    if installed.claims_editable is not None and only_editable_files(installed):
        installed.editable = installed.claims_editable
    return installed


def distributions(root: str) -> list[InstalledDist]:
    """Every distribution whose metadata folder is directly in ``root``."""
    found: list[InstalledDist] = []
    for dist in metadata.distributions(path=[root]):
        installed = load_dist(dist, root)
        if installed is not None:
            found.append(installed)
    found.sort(key=lambda d: (d.name.lower(), d.meta_dir))
    return found
