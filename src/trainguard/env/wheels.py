"""A reference that does not live on the host: a folder of wheels and a lock file.

RECORD lives beside the files it describes, so whoever edits an installed
file can rewrite its RECORD line too, and plain ``env verify`` cannot tell.
The wheels the environment was installed from can: ``--wheelhouse DIR`` (a
folder of ``.whl`` files, searched recursively, so pip's wheel cache works
too) and ``--lock FILE`` (``requirements.txt`` with ``--hash=sha256:`` pins,
or a PEP 751 ``pylock.toml``) say which distributions and which wheel files
are expected; :func:`choose_wheel` picks the wheel of an installed
distribution, and :mod:`trainguard.env.reference` compares the installed
files with its members.

Everything here is read with caps (lock size, wheels indexed, folder depth);
a lock that cannot be read is a usage error, never an empty lock.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import BinaryIO

from trainguard.env.findings import finding
from trainguard.env.record import InstalledDist
from trainguard.errors import UsageError
from trainguard.findings import Finding, Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MAX_LOCK_BYTES = 16 * 1024 * 1024
MAX_WHEELS = 100_000  # .whl files indexed in one wheelhouse
MAX_DEPTH = 12  # pip's cache: wheels/ab/cd/ef/<rest of the hash>/NAME.whl
MAX_WHEEL_BYTES = 16 * 1024 * 1024 * 1024
MAX_TAG_BYTES = 64 * 1024
HASHES = ("sha256", "sha384", "sha512")
_HASH_OPTION = re.compile(r"--hash[=\s]+([A-Za-z0-9]+):([0-9A-Fa-f]+)")
_CLAUSE = r"(?:===|==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT = re.compile(
    rf"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*({_CLAUSE}(?:\s*,\s*{_CLAUSE})*)?\s*"
    r"(;[^-]*)?(?=--|$)"
)


def canonical_name(name: str) -> str:
    """PEP 503: ``Foo.Bar_baz`` and ``foo-bar-baz`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def canonical_version(version: str) -> str:
    # Enough of PEP 440 for pins: case, a leading v, and -/_ as separators.
    text = version.strip().lower()
    text = text[1:] if text.startswith("v") else text
    return re.sub(r"[-_]", ".", text)


@dataclass(frozen=True)
class WheelFile:
    path: str
    name: str  # canonical
    version: str  # canonical
    tags: frozenset[str]  # every python-abi-platform combination the file name covers


@dataclass
class Locked:
    versions: set[str] = field(default_factory=set)  # canonical; empty: any version
    hashes: set[tuple[str, str]] = field(default_factory=set)  # (algorithm, lowercase hex)


@dataclass
class Reference:
    """The wheels found, by (name, version), and what the lock pins, by name."""

    wheels: dict[tuple[str, str], list[WheelFile]] = field(default_factory=dict)
    lock: dict[str, Locked] | None = None
    label: str = ""
    problems: list[str] = field(default_factory=list)  # folders that could not be read

    def add(self, wheel: WheelFile) -> None:
        self.wheels.setdefault((wheel.name, wheel.version), []).append(wheel)


def parse_wheel_name(path: str) -> WheelFile | None:
    """``{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl``, or None."""
    base = os.path.basename(path)
    if not base.endswith(".whl"):
        return None
    parts = base[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return None
    name, version = parts[0], parts[1]
    pythons, abis, platforms = (p.split(".") for p in parts[-3:])
    tags = frozenset(f"{p}-{a}-{pl}" for p in pythons for a in abis for pl in platforms)
    return WheelFile(path, canonical_name(name), canonical_version(version), tags)


def index_wheelhouse(folder: str, ref: Reference) -> None:
    """Add every ``.whl`` below ``folder`` (links not followed) to ``ref``."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: the wheelhouse is not a folder")
    count = 0
    pending = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        try:
            with os.scandir(current) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            ref.problems.append(f"{current}: cannot be listed ({exc.strerror})")
            continue
        for item in items:
            if item.is_dir(follow_symlinks=False):
                if depth + 1 < MAX_DEPTH:
                    pending.append((item.path, depth + 1))
                continue
            wheel = parse_wheel_name(item.path) if item.is_file(follow_symlinks=False) else None
            if wheel is None:
                continue
            count += 1
            if count > MAX_WHEELS:
                ref.problems.append(f"{folder}: more than {MAX_WHEELS} wheels; the rest ignored")
                return
            ref.add(wheel)


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file: a FIFO put where a file was
    expected is never waited on, a device never read."""
    fd = os.open(path, _OPEN_FLAGS)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _read_lock(path: str) -> str:
    try:
        with open_regular(path) as fh:
            raw = fh.read(MAX_LOCK_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the lock file: {exc.strerror}") from None
    if len(raw) > MAX_LOCK_BYTES:
        raise UsageError(f"{path}: lock file larger than {MAX_LOCK_BYTES} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the lock file is not UTF-8") from None


def parse_requirements(text: str, source: str) -> dict[str, Locked]:
    """``name==version --hash=sha256:HEX ...`` lines (pip's hash-checking mode)."""
    lock: dict[str, Locked] = {}
    logical = re.sub(r"\\\r?\n", " ", text)
    for number, raw in enumerate(logical.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line or line.startswith("-"):
            continue  # options (--index-url, -r, -e, ...): nothing a lock pins
        # name @ URL: a direct reference pins the file (by its hashes), not a version.
        line = re.sub(r"^([A-Za-z0-9][A-Za-z0-9._-]*\s*(?:\[[^\]]*\])?)\s*@\s*\S+", r"\1", line)
        match = _REQUIREMENT.match(line)
        if match is None:
            raise UsageError(f"{source}:{number}: not a requirement: {line[:80]!r}")
        entry = lock.setdefault(canonical_name(match.group(1)), Locked())
        spec = (match.group(3) or "").replace(" ", "")
        if spec.startswith("==") and "," not in spec:  # a pin; ranges pin nothing
            entry.versions.add(canonical_version(spec.lstrip("=")))
        rest = line[match.end() :]
        if _HASH_OPTION.sub("", rest).strip():
            raise UsageError(f"{source}:{number}: not understood: {rest.strip()[:80]!r}")
        for algorithm, digest in _HASH_OPTION.findall(line):
            if algorithm.lower() not in HASHES:
                raise UsageError(f"{source}:{number}: unsupported hash {algorithm!r}")
            entry.hashes.add((algorithm.lower(), digest.lower()))
    return lock


def parse_pylock(text: str, source: str, ref: Reference) -> dict[str, Locked]:
    """PEP 751 ``pylock.toml``: ``[[packages]]`` with ``version`` and ``wheels``
    (each with ``hashes``, and a ``path`` that is added to the wheelhouse)."""
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise UsageError(f"{source}: not a TOML lock file: {exc}") from None
    packages = doc.get("packages")
    if not isinstance(packages, list):
        raise UsageError(f"{source}: no [[packages]] table")
    lock: dict[str, Locked] = {}
    base = os.path.dirname(os.path.abspath(source))
    for package in packages:
        if not isinstance(package, dict) or not isinstance(package.get("name"), str):
            raise UsageError(f"{source}: a [[packages]] entry without a name")
        entry = lock.setdefault(canonical_name(package["name"]), Locked())
        if isinstance(package.get("version"), str):
            entry.versions.add(canonical_version(package["version"]))
        wheels = package.get("wheels", [])
        for wheel in wheels if isinstance(wheels, list) else []:
            hashes = wheel.get("hashes") if isinstance(wheel, dict) else None
            for algorithm, digest in (hashes or {}).items():
                if algorithm in HASHES and isinstance(digest, str):
                    entry.hashes.add((algorithm, digest.lower()))
            path = wheel.get("path") if isinstance(wheel, dict) else None
            if isinstance(path, str):
                found = parse_wheel_name(os.path.join(base, path))
                if found is not None and os.path.isfile(found.path):
                    ref.add(found)
    return lock


def load_reference(wheelhouse: list[str], lock: str | None) -> Reference:
    ref = Reference(label=", ".join([*wheelhouse, *([lock] if lock else [])]))
    for folder in wheelhouse:
        index_wheelhouse(folder, ref)
    if lock is not None:
        text = _read_lock(lock)
        if lock.endswith(".toml"):
            ref.lock = parse_pylock(text, lock, ref)
        else:
            ref.lock = parse_requirements(text, lock)
    return ref


def file_digest(path: str, algorithm: str) -> bytes:
    """The digest of a wheel file, streamed; OSError when it cannot be read whole."""
    hasher = hashlib.new(algorithm)
    with open_regular(path) as fh:
        if os.fstat(fh.fileno()).st_size > MAX_WHEEL_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_WHEEL_BYTES} bytes")
        while chunk := fh.read(1024 * 1024):
            hasher.update(chunk)
    return hasher.digest()


def _installed_tags(meta_dir: str) -> set[str]:
    try:
        with open_regular(os.path.join(meta_dir, "WHEEL")) as fh:
            text = fh.read(MAX_TAG_BYTES).decode("utf-8", "replace")
    except OSError:
        return set()
    return {line[4:].strip() for line in text.splitlines() if line.startswith("Tag:")}


def choose_wheel(dist: InstalledDist, ref: Reference) -> tuple[WheelFile | None, list[Finding]]:
    """The wheel to compare ``dist`` with, and the findings about the choice."""
    name, version = canonical_name(dist.name), canonical_version(dist.version)
    out: list[Finding] = []
    locked = ref.lock.get(name) if ref.lock is not None else None
    if ref.lock is not None:
        if locked is None:
            out.append(
                finding(
                    "TG622",
                    f"{dist.label} is installed but not in the lock file",
                    dist.meta_dir,
                    severity=Severity.HIGH,
                    lock=ref.label,
                )
            )
            return None, out
        if locked.versions and version not in locked.versions:
            out.append(
                finding(
                    "TG622",
                    f"{dist.label} is installed; the lock file pins "
                    f"{', '.join(sorted(locked.versions))}",
                    dist.meta_dir,
                    severity=Severity.HIGH,
                    lock=ref.label,
                )
            )
            return None, out
    candidates = ref.wheels.get((name, version), [])
    tags = _installed_tags(dist.meta_dir)
    if tags:
        candidates = [w for w in candidates if w.tags & tags] or candidates
    rejected: list[str] = []
    for wheel in candidates:
        if locked is None or not locked.hashes:
            return wheel, out
        try:
            digests = {(a, file_digest(wheel.path, a).hex()) for a in {a for a, _ in locked.hashes}}
        except OSError as exc:
            rejected.append(f"{wheel.path} ({exc})")
            continue
        if digests & locked.hashes:
            return wheel, out
        rejected.append(f"{wheel.path} (hash not in the lock)")
    if rejected:
        out.append(
            finding(
                "TG622",
                f"no wheel of {dist.label} has a hash the lock file lists: "
                + "; ".join(rejected[:3]),
                dist.meta_dir,
                severity=Severity.HIGH,
            )
        )
    else:
        others = sorted(v for (n, v) in ref.wheels if n == name and v != version)
        # The reference knows this project at other versions only: an installed version
        # no wheel has is what an edit of METADATA's Version (to escape the comparison)
        # looks like.  A project the reference does not hold at all is only not covered.
        out.append(
            finding(
                "TG622",
                f"{dist.label} is installed, but the reference holds only "
                f"{', '.join(others[:5])} of it; its files were not compared"
                if others
                else f"no wheel of {dist.label} in the reference; its files were not compared",
                dist.meta_dir,
                severity=Severity.HIGH if others else Severity.MEDIUM,
                reference=ref.label,
            )
        )
    return None, out
