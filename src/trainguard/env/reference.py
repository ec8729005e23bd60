"""Compare every installed file with the file of the wheel it came from.

For each installed distribution: find its wheel in the reference (same name
and version, a tag the installed ``WHEEL`` file names, and, with a lock, a
file hash the lock lists), then walk the wheel's members, which are the
reference, not RECORD: each member's installed file must exist and hash the
same (TG619), so an edit made together with a rewritten RECORD, or with its
RECORD line deleted, fails.  Then every RECORD row that no member explains
must be something the installer writes: the pycs it compiles (the pyc check
judges them), ``RECORD``, ``INSTALLER``, ``REQUESTED``, ``direct_url.json``,
and launchers for the entry points (checked by :mod:`.launcher`); anything
else is TG620.  Scripts shipped in ``.data/scripts`` have their ``#!python``
line rewritten on install: the rest must be byte for byte the member's.

Members are streamed out of the zip and hashed with caps on their count and
sizes; a wheel that cannot be read is a finding (TG622), never a pass.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from trainguard.env.findings import finding
from trainguard.env.launcher import (
    body_after_shebang,
    entry_points,
    interpreter_problem,
    launcher_problem,
)
from trainguard.env.record import InstalledDist
from trainguard.env.wheels import Reference, WheelFile, canonical_name, choose_wheel, open_regular
from trainguard.findings import Finding, Severity

MAX_MEMBERS = 500_000
MAX_MEMBER_BYTES = 8 * 1024 * 1024 * 1024
MAX_SCRIPT_BYTES = 16 * 1024 * 1024
MAX_ENTRY_POINTS_BYTES = 1024 * 1024
CHUNK = 1024 * 1024
# Written by the installer, not taken from the wheel.
INSTALL_TIME = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
# Returns the installed file's sha256, or an error text.
Hasher = Callable[[str], "bytes | str"]


class WheelError(Exception):
    pass


def _in_scripts(path: str, root: str) -> bool:
    """Where installers put scripts: outside the site folder (a prefix's bin/), or the
    bin/ right in it (``pip install --target``)."""
    folder = os.path.dirname(path)
    if not path.startswith(root + os.sep):
        return True
    return os.path.dirname(folder) == root and os.path.basename(folder) in ("bin", "Scripts")


def _where(path: str, root: str) -> str:
    """Where a RECORD row's file is.  ``pip install --target`` writes rows such as
    ``../../bin/tool`` relative to the folder it installed into before moving it, so a
    row outside ``root`` that is not there is looked for inside ``root`` as well."""
    if path.startswith(root + os.sep) or os.path.lexists(path):
        return path
    parts = os.path.relpath(path, root).split(os.sep)
    while parts and parts[0] == os.pardir:
        parts.pop(0)
    inside = os.path.join(root, *parts) if parts else path
    return inside if os.path.lexists(inside) else path


def _outside_rows(dist: InstalledDist) -> dict[str, str]:
    """RECORD rows where scripts and data files go, by file name; a script folder's row
    wins over another of the same name (``.data/scripts`` members are found by name)."""
    rows: dict[str, str] = {}
    for entry in dist.entries:
        if not _in_scripts(entry.path, dist.root):
            continue
        path = _where(entry.path, dist.root)
        name = os.path.basename(path)
        in_bin = os.path.basename(os.path.dirname(path)) in ("bin", "Scripts")
        if name not in rows or in_bin:
            rows[name] = path
    return rows


@dataclass(frozen=True)
class _Layout:
    root: str  # the site folder
    meta_dir: str  # the installed .dist-info
    wheel_meta: str  # its name inside the wheel
    data: str  # the wheel's NAME-VERSION.data folder name


def _member_sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    hasher = hashlib.sha256()
    total = 0
    with zf.open(info) as fh:
        while chunk := fh.read(CHUNK):
            total += len(chunk)
            if total > info.file_size:
                raise WheelError(f"{info.filename}: longer than its header says")
            hasher.update(chunk)
    return hasher.digest()


def _target(member: str, lay: _Layout, outside: dict[str, str]) -> tuple[str | None, str]:
    """Where ``member`` was installed, and how it is compared ("file", "script")."""
    head, _, rest = member.partition("/")
    if head == lay.wheel_meta:
        return os.path.join(lay.meta_dir, *rest.split("/")), "file"
    if head == lay.data:
        scheme, _, inner = rest.partition("/")
        if scheme in ("purelib", "platlib"):
            return os.path.join(lay.root, *inner.split("/")), "file"
        if scheme == "scripts":
            return outside.get(inner), "script"
        # data and headers land under the prefix: the RECORD row ending so says where.
        suffix = "/" + inner
        found = [p for p in outside.values() if p.replace(os.sep, "/").endswith(suffix)]
        return (found[0] if len(found) == 1 else None), "file"
    return os.path.join(lay.root, *member.split("/")), "file"


def compare_dist(dist: InstalledDist, wheel: WheelFile, installed_sha256: Hasher) -> list[Finding]:
    """Findings for every installed file of ``dist`` that its wheel does not explain."""
    out: list[Finding] = []
    evidence = {"wheel": wheel.path}
    try:
        with zipfile.ZipFile(wheel.path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_MEMBERS:
                raise WheelError(f"more than {MAX_MEMBERS} members")
            metas = {i.filename.split("/")[0] for i in infos if ".dist-info/" in i.filename}
            metas = {m for m in metas if m.endswith(".dist-info")}
            if len(metas) != 1:
                raise WheelError("not exactly one .dist-info folder")
            (wheel_meta,) = metas
            lay = _Layout(
                dist.root, dist.meta_dir, wheel_meta, wheel_meta[: -len(".dist-info")] + ".data"
            )
            outside = _outside_rows(dist)
            explained: set[str] = set()
            # The wheel's entry points, not the installed copy, say what launchers call.
            scripts = _wheel_entry_points(zf, wheel_meta)
            for info in infos:
                out.extend(
                    _compare_member(zf, info, lay, outside, installed_sha256, explained, evidence)
                )
    except (
        OSError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        WheelError,
        RuntimeError,
        ValueError,
        EOFError,
    ) as exc:
        return [
            finding(
                "TG622",
                f"the wheel {os.path.basename(wheel.path)} cannot be read: {exc}",
                dist.meta_dir,
                severity=Severity.HIGH,
                evidence=evidence,
            )
        ]
    out.extend(_unexplained(dist, explained, scripts, evidence))
    return out


def _compare_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    lay: _Layout,
    outside: dict[str, str],
    installed_sha256: Hasher,
    explained: set[str],
    evidence: dict[str, str],
) -> list[Finding]:
    member = info.filename
    if member.startswith("/") or ".." in member.split("/"):
        raise WheelError(f"member {member[:200]!r} climbs out of the wheel")
    if info.file_size > MAX_MEMBER_BYTES:
        raise WheelError(f"member {member[:200]!r} larger than {MAX_MEMBER_BYTES} bytes")
    head, _, rest = member.partition("/")
    if head == lay.wheel_meta and rest in INSTALL_TIME | {"RECORD.jws", "RECORD.p7s"}:
        return []
    target, how = _target(member, lay, outside)
    more = {**evidence, "member": member}
    if target is None or not os.path.lexists(target):
        where = target or f"(no installed file for {member})"
        return [
            finding(
                "TG621", f"the wheel holds {member}, but it is not installed", where, evidence=more
            )
        ]
    explained.add(target)
    if how == "script":
        return _compare_script(zf, info, target, more)
    got = installed_sha256(target)
    if isinstance(got, str):
        return [
            finding(
                "TG619",
                f"cannot be compared with {member} of its wheel: {got}",
                target,
                evidence=more,
            )
        ]
    want = _member_sha256(zf, info)
    if got != want:
        return [
            finding(
                "TG619",
                f"content differs from {member} in the wheel it was "
                f"installed from (sha256 {got.hex()[:16]}..., the wheel has "
                f"{want.hex()[:16]}...)",
                target,
                evidence={**more, "sha256": got.hex(), "wheel_sha256": want.hex()},
            )
        ]
    return []


def _compare_script(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: str, more: dict[str, str]
) -> list[Finding]:
    if info.file_size > MAX_SCRIPT_BYTES:
        return [finding("TG619", f"{info.filename} is too large to compare", target, evidence=more)]
    with zf.open(info) as fh:
        member = fh.read(MAX_SCRIPT_BYTES + 1)
    try:
        with open_regular(target) as fh:
            installed = fh.read(MAX_SCRIPT_BYTES + CHUNK)
    except OSError as exc:
        return [finding("TG619", f"cannot be read: {exc.strerror}", target, evidence=more)]
    if member.startswith((b"#!python", b"#!pythonw")):
        split = body_after_shebang(installed)
        # The installer replaces #!python with this interpreter's path; nothing else.
        if split is not None and split[1] == member.partition(b"\n")[2]:
            problem = interpreter_problem(split[0], target)
            if problem is None:
                return []
            return [
                finding("TG619", f"a script of its wheel, but {problem}", target, evidence=more)
            ]
    elif installed == member:
        return []
    return [
        finding(
            "TG619",
            f"differs from {info.filename} in its wheel (beyond the interpreter line an "
            "installer writes)",
            target,
            evidence=more,
        )
    ]


def _unexplained(
    dist: InstalledDist, explained: set[str], scripts: dict[str, str], evidence: dict[str, str]
) -> list[Finding]:
    out: list[Finding] = []
    for entry in dist.entries:
        path = _where(entry.path, dist.root)
        if path in explained:
            continue
        folder, name = os.path.split(path)
        if os.path.basename(folder) == "__pycache__" and name.endswith(".pyc"):
            continue  # compiled at install time; the pyc check compares it with its source
        if folder == dist.meta_dir and name in INSTALL_TIME:
            continue
        if name in scripts and _in_scripts(entry.path, dist.root):
            problem = _launcher(path, scripts[name])
            if problem is not None:
                out.append(
                    finding(
                        "TG619",
                        f"not a launcher for the entry point {name} = {scripts[name]}: {problem}",
                        path,
                        evidence=evidence,
                    )
                )
            continue
        if os.path.lexists(path):
            out.append(
                finding(
                    "TG620",
                    f"{dist.label}'s RECORD lists it, but its wheel does "
                    "not hold it and no installer writes it",
                    path,
                    evidence=evidence,
                )
            )
    return out


def _wheel_entry_points(zf: zipfile.ZipFile, wheel_meta: str) -> dict[str, str]:
    try:
        info = zf.getinfo(f"{wheel_meta}/entry_points.txt")
    except KeyError:
        return {}
    if info.file_size > MAX_ENTRY_POINTS_BYTES:
        raise WheelError("entry_points.txt larger than any")
    with zf.open(info) as fh:
        return entry_points(fh.read(MAX_ENTRY_POINTS_BYTES).decode("utf-8", "replace"))


def _launcher(path: str, target: str) -> str | None:
    try:
        with open_regular(path) as fh:
            data = fh.read(64 * 1024 + 1)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return launcher_problem(path, data, target)


def _has_project(ref: Reference, dist: InstalledDist) -> bool:
    """Whether the lock or the wheelhouse has any version of ``dist``'s project."""
    name = canonical_name(dist.name)
    return (ref.lock is not None and name in ref.lock) or any(n == name for n, _ in ref.wheels)


def reference_findings(
    dists: list[InstalledDist], ref: Reference, installed_sha256: Hasher, workers: int
) -> list[Finding]:
    """Every distribution compared with its wheel, wheels read side by side (zlib and
    hashlib release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    out = [finding("TG622", f"reference: {p}", p, severity=Severity.MEDIUM) for p in ref.problems]

    def one(dist: InstalledDist) -> list[Finding]:
        found: list[Finding] = []
        if dist.claims_editable is not None:
            # direct_url.json is as writable as the code: a claim to be editable
            # never exempts a project the reference knows from the comparison.
            if not _has_project(ref, dist):
                if dist.editable:
                    return []  # built from a source folder: no wheel (TG613 says so)
            else:
                message = (
                    f"{dist.label} says it is an editable install (direct_url.json), but "
                    f"the reference has this project: compared with its wheel all the same"
                )
                found.append(finding("TG622", message, dist.meta_dir, severity=Severity.HIGH))
        wheel, chosen = choose_wheel(dist, ref)
        found += chosen
        if wheel is not None:
            found.extend(compare_dist(dist, wheel, installed_sha256))
        return found

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tg-wheel") as pool:
        for found in pool.map(one, dists):
            out.extend(found)
    return out
