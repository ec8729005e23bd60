"""Gather the evidence for ``env verify`` in one pass over the environment.

Order: read every RECORD, list every file under the site folders, sort each
file into what judges it (a RECORD row, the ``.pth`` check, the customize
check, the pyc check, or nothing: unlisted), hash what needs hashing (once,
with every algorithm any RECORD asks for), then compile what needs compiling.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainguard.digest_cache import DigestCache
from trainguard.env.checks import Ownership, record_findings
from trainguard.env.digests import DEFAULT_ALGORITHM, Digests, Progress, hash_file, hash_wanted
from trainguard.env.epgroups import plugin_findings
from trainguard.env.findings import (
    finding,
    is_code,
    pth_findings,
    pyc_finding,
    startup_finding,
)
from trainguard.env.imports import owned_folders
from trainguard.env.native import foreign_rows
from trainguard.env.pathcode import root_code
from trainguard.env.pth import pth_files, read_pth, startup_modules
from trainguard.env.pyc import PycJob, check_pycs
from trainguard.env.record import InstalledDist, distributions
from trainguard.env.reference import reference_findings
from trainguard.env.scripts import launcher_findings
from trainguard.env.snapshot import compare_snapshot, interpreter_findings
from trainguard.env.sort import (
    PYCACHE,
    Scope,
    Sorted,
    in_pycache,
    sort_files,
    source_of,
    walk_scope,
)
from trainguard.env.syspath import editable_names
from trainguard.env.unlisted import loose_findings
from trainguard.env.venvfiles import fingerprint_paths, venv_findings, venv_of
from trainguard.env.vouch import (
    AUTOLOAD_GROUPS,
    autoload_findings,
    generated_hook,
    metadata_only,
    unrecorded_code,
)
from trainguard.env.walk import SPECIAL, entry_in
from trainguard.filestate import Entry, Identity, default_workers
from trainguard.findings import Finding

if TYPE_CHECKING:
    from trainguard.env.verdict import Observed


@dataclass
class EnvStats:
    roots: list[str]
    stdlib: list[str] = field(default_factory=list)
    distributions: int = 0
    files: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    pycs_checked: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    # When nothing changed since a verify, that verify's time (a Unix time):
    # its result was reused.
    reused_from: float | None = None


@dataclass
class Evidence:
    dists: list[InstalledDist]
    own: Ownership
    stats: EnvStats
    findings: list[Finding] = field(default_factory=list)
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # meta_dir -> reasons
    walk_errors: dict[str, str] = field(default_factory=dict)
    file_errors: dict[str, str] = field(default_factory=dict)  # unreadable, owned by no one
    all_digests: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Files RECORD rows name outside the walked folders, with the stat taken
    # before any was read (None: missing).
    outside: dict[str, Identity | None] = field(default_factory=dict)
    # The stat of every file read, from the open descriptor (see env_verdict.consistent).
    reads: dict[str, Identity] = field(default_factory=dict)

    def owner_of(self, path: str) -> InstalledDist | None:
        """The distribution a finding about ``path`` belongs to, if any."""
        dist = self.own.owner(path)
        if dist is None:
            folder = os.path.dirname(path)
            if os.path.basename(folder) == PYCACHE:
                dist = self.own.owner(source_of(path))
        if dist is None:
            dist = next((d for d in self.dists if d.meta_dir == path), None)
        return dist or self.own.claimed_by(path)


def _verified(path: str, own: Ownership, digests: dict[str, Digests]) -> bool:
    rows = [e for _, e in own.rows.get(path, []) if e.digest is not None]
    got = digests.get(path)
    return (
        bool(rows)
        and got is not None
        and all(e.algorithm is not None and got.values.get(e.algorithm) == e.digest for e in rows)
    )


def _check_pycs(
    ev: Evidence,
    sorted_: Sorted,
    present: dict[str, str],
    cache: DigestCache | None,
    workers: int | None,
    progress: Progress | None,
    stats: dict[str, Entry | None],
) -> None:
    jobs: list[PycJob] = []
    keys: dict[str, tuple[Identity, Identity]] = {}
    for pyc, source, level in sorted_.pycs:
        if source not in present and not os.path.exists(source):
            if ev.own.owner(source) is None:  # a listed source that is gone is TG602
                ev.findings.append(
                    finding(
                        "TG612",
                        "stale compiled file that Python does not load (its source is gone)",
                        pyc,
                    )
                )
            continue
        ev.stats.pycs_checked += 1
        if cache is not None:
            pyc_entry = entry_in(stats, pyc)
            src_entry = entry_in(stats, source)
            if pyc_entry is not None and src_entry is not None:
                if cache.pyc_verified(pyc, pyc_entry.identity, src_entry.identity):
                    continue
                keys[pyc] = (pyc_entry.identity, src_entry.identity)
        jobs.append(PycJob(pyc, source, level))
    if progress is not None:
        progress.start("compiling", len(jobs))
    for verdict in check_pycs(
        jobs, workers=workers, progress=progress.advance if progress else None
    ):
        for path, key in ((verdict.pyc, verdict.pyc_key), (verdict.source, verdict.source_key)):
            if key is not None:
                ev.reads[path] = key
        problem = pyc_finding(verdict)
        if problem is not None:
            ev.findings.append(problem)
        elif cache is not None and keys.get(verdict.pyc) == (verdict.pyc_key, verdict.source_key):
            # Remembered under the stats of the files compared, and only when those
            # are the files that were looked up.
            cache.remember_pyc(verdict.pyc, *keys[verdict.pyc])


_DEFAULT_ONLY = frozenset({DEFAULT_ALGORITHM})


def _wanted(
    scope: Scope, ev: Evidence, files: dict[str, str], sorted_: Sorted, extra: list[str]
) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    """Every file to hash, with every algorithm some RECORD uses for it."""
    wanted: dict[str, frozenset[str]] = {}
    sizes: dict[str, int] = {}
    for dist in ev.dists:
        for entry in dist.entries:
            algorithm = entry.algorithm
            if algorithm is None:
                continue
            before = wanted.get(entry.path, _DEFAULT_ONLY)
            # One shared set in the usual case (sha256 only): torch alone has
            # 15,000 rows.
            wanted[entry.path] = before if algorithm in before else before | {algorithm}
            sizes[entry.path] = entry.size or 0
    for path in (*extra, *sorted_.unlisted, *sorted_.legacy_pycs):
        wanted.setdefault(path, _DEFAULT_ONLY)
    if scope.collect_digests:
        # A snapshot records the venv's own start-up files too (env.venvfiles); a
        # comparison hashes them as every path the snapshot lists.
        for venv in dict.fromkeys(v for v in map(venv_of, scope.roots) if v is not None):
            for path in fingerprint_paths(venv):
                if path.startswith(venv + os.sep):
                    wanted.setdefault(path, _DEFAULT_ONLY)
    if scope.collect_digests or scope.against is not None:
        # A snapshot records cached pycs too (for --no-pyc); comparing with
        # one leaves them to the pyc check, so they need no digest then.
        skip_pycs = scope.check_pyc and not scope.collect_digests
        for path in (*files, *(scope.against.files if scope.against is not None else ())):
            if not (skip_pycs and in_pycache(path)):
                wanted.setdefault(path, _DEFAULT_ONLY)
    return wanted, sizes


def _dist_findings(ev: Evidence, sorted_: Sorted, hashed: Hashed) -> None:
    for dist in ev.dists:
        found, unreadable = record_findings(dist, hashed.digests, hashed.errors, hashed.present)
        ev.findings.extend(dist.problems)
        ev.findings.extend(found)
        if unreadable:
            ev.unreadable[dist.meta_dir] = unreadable
        if not dist.has_record:
            ev.findings.append(
                finding(
                    "TG613",
                    f"{dist.label} has no RECORD, so its files cannot be verified "
                    f"({sorted_.claimed[dist.meta_dir]} files it claims were not checked)",
                    dist.meta_dir,
                )
            )
        if dist.editable:
            ev.findings.append(
                finding(
                    "TG613",
                    f"{dist.label} is an editable install: its code in {dist.editable} "
                    "is not verified",
                    dist.meta_dir,
                    editable=dist.editable,
                )
            )


def _sha256_of(hashed: Hashed) -> Callable[[str], bytes | str]:
    """An installed file's sha256: from this verify's digests, else read now."""

    def sha256(path: str) -> bytes | str:
        got = hashed.digests.get(path)
        if got is not None and DEFAULT_ALGORITHM in got.values:
            return got.values[DEFAULT_ALGORITHM]
        if path in hashed.errors:
            return hashed.errors[path]
        try:
            return hash_file(path, frozenset({DEFAULT_ALGORITHM})).values[DEFAULT_ALGORITHM]
        except OSError as exc:
            return exc.strerror or str(exc)

    return sha256


@dataclass
class Hashed:
    present: dict[str, str]  # every entry under the site and stdlib folders
    digests: dict[str, Digests]
    errors: dict[str, str]


def _snapshot_findings(scope: Scope, ev: Evidence, sorted_: Sorted, hashed: Hashed) -> None:
    against = scope.against
    if against is None:
        return
    skip = set(sorted_.foreign_pycs)
    if scope.check_pyc:
        skip.update(p for p, _, _ in sorted_.pycs)
        skip.update(p for p in against.files if in_pycache(p))
    sha256 = {p: d.values[DEFAULT_ALGORITHM].hex() for p, d in hashed.digests.items()}
    failed = {p for p in hashed.errors if os.path.lexists(p)}
    ev.findings.extend(compare_snapshot(against, sha256, hashed.present, failed, skip, is_code))
    ev.findings.extend(interpreter_findings(against, scope.against_label))


def _observed_pths(
    roots: list[str], present: dict[str, str], stats: dict[str, Entry | None]
) -> list[str]:
    """The ``.pth`` files directly in each root, as :func:`pth_files` lists them, from the walk."""
    by_root: dict[str, list[str]] = {root: [] for root in roots}
    for path in present:
        if path.endswith(".pth"):
            folder = os.path.dirname(path)
            entry = stats.get(path)
            if folder in by_root and entry is not None and entry.regular:
                by_root[folder].append(path)
    return [p for root in roots for p in sorted(by_root[root])]


def _vouched_by(
    compared: list[Finding] | None, own: Ownership
) -> Callable[[str, InstalledDist | None], bool]:
    """Whether the reference compared ``file`` of ``dist`` with a wheel and found nothing
    wrong with it or with ``dist`` (a finding about any of its files, or no wheel);
    ``compared`` None: there is no reference, nothing is vouched for."""
    flagged = {f.file for f in compared or ()}
    dists = {d.meta_dir for d in (own.owner(f) for f in flagged) if d is not None}

    def vouched(file: str, dist: InstalledDist | None) -> bool:
        return (
            compared is not None
            and dist is not None
            and file not in flagged
            and dist.meta_dir not in flagged
            and dist.meta_dir not in dists
        )

    return vouched


def _own_names(scope: Scope, own: Ownership, digests: dict[str, Digests]) -> dict[str, set[str]]:
    """Path entry -> the module names an editable install provides there as its own: its
    project's name, from the source folder its verified ``.pth`` adds (TG613 says that
    folder is not verified; any other name there is judged as planted code)."""
    out: dict[str, set[str]] = {}
    for root in scope.path_roots:
        dist = own.owner(root.pth)
        if (
            dist is not None
            and dist.editable
            and _verified(root.pth, own, digests)
            and os.path.realpath(root.path) == os.path.realpath(dist.editable)
        ):
            out[root.path] = editable_names(dist.name)
    return out


def _identity_in(stats: dict[str, Entry | None]) -> Callable[[str], Identity | None]:
    def identity(path: str) -> Identity | None:
        entry = entry_in(stats, path)
        return entry.identity if entry is not None else None

    return identity


def gather(
    scope: Scope,
    cache: DigestCache | None,
    progress: Progress | None,
    observed: Observed | None = None,
) -> Evidence:
    """Everything a verify concludes; ``observed`` is the walk and stats already taken."""
    dists = [d for root in scope.roots for d in distributions(root)]
    own = Ownership.of(dists)
    ev = Evidence(dists, own, EnvStats(roots=list(scope.roots), distributions=len(dists)))
    stats: dict[str, Entry | None] = {}
    if observed is not None:
        present, stdlib = observed.present, observed.stdlib
        ev.walk_errors.update(observed.walk_errors)
        stats.update(observed.entries)
        startup = observed.startup
        pths = _observed_pths(scope.roots, present, stats)
    else:
        present, stdlib = walk_scope(scope, ev.walk_errors)
        startup = startup_modules(scope.search)
        pths = [p for root in scope.roots for p in pth_files(root)]
    ev.stats.files = len(present) + len(stdlib)
    for dist in dists:
        if dist.record_key is not None:
            ev.reads[os.path.join(dist.meta_dir, "RECORD")] = dist.record_key
    startup_paths = [path for _, path, _ in startup]
    sorted_ = sort_files(present, own, {*pths, *startup_paths})
    sorted_.pycs.extend(sort_files(stdlib, Ownership(), set(stdlib)).pycs)
    files = {**present, **stdlib}
    wanted, sizes = _wanted(scope, ev, files, sorted_, [*pths, *startup_paths])
    digests, errors, ev.stats.hashed_bytes = hash_wanted(
        wanted, sizes, files, cache, scope.workers, progress, stats
    )
    for dist in dists:
        for row in dist.entries:
            path = row.path
            if path not in files and path not in ev.outside:  # out of the site folders
                entry = entry_in(stats, path)
                ev.outside[path] = entry.identity if entry is not None else None
    ev.reads.update((path, got.key) for path, got in digests.items())
    ev.stats.hashed_files = len(digests) - (cache.hits if cache is not None else 0)
    for path, reason in errors.items():
        if own.owner(path) is None and files.get(path) != SPECIAL and os.path.lexists(path):
            ev.file_errors[path] = reason
    hashed = Hashed(files, digests, errors)
    _dist_findings(ev, sorted_, hashed)
    ev.findings.extend(foreign_rows(dists, scope.roots))
    # Start-up hooks that only a RECORD row vouches for wait for the reference (if any).
    hooks: list[tuple[Finding, InstalledDist | None]] = []
    for path in pths:
        verified = _verified(path, own, digests)
        pth = read_pth(path)
        if pth.key is not None:
            ev.reads[path] = pth.key
        owner = own.owner(path)
        for item in pth_findings(pth, owner, verified, scope.roots):
            if item.rule == "TG606" and not generated_hook(pth, owner):
                hooks.append((item, owner))
            else:
                ev.findings.append(item)
    for module, path, position in startup:
        verified = _verified(path, own, digests)
        item = startup_finding(module, path, position, own.owner(path), verified)
        if item.rule == "TG609":
            hooks.append((item, own.owner(path)))
        else:
            ev.findings.append(item)
    for venv in dict.fromkeys(v for v in map(venv_of, scope.roots) if v is not None):
        ev.findings.extend(venv_findings(venv, scope.roots))
    launchers, looked_at = launcher_findings(dists, scope.roots)
    ev.findings.extend(launchers)
    ev.outside.update(looked_at)
    ev.findings.extend(unrecorded_code(dists))
    code = root_code(
        list(scope.path_roots), sorted_.unlisted, owned_folders(own.rows, scope.roots), own.owner
    )
    ev.outside.update(code.outside)
    ev.findings.extend(code.findings)
    ev.findings.extend(
        loose_findings(
            scope,
            own,
            dists,
            sorted_,
            files,
            digests,
            code.candidates,
            _own_names(scope, own, digests),
        )
    )
    if scope.check_pyc:
        _check_pycs(ev, sorted_, files, cache, scope.workers, progress, stats)
    _snapshot_findings(scope, ev, sorted_, hashed)
    vouched = _vouched_by(None, own)
    if scope.reference is not None:
        compared = reference_findings(
            dists, scope.reference, _sha256_of(hashed), scope.workers or default_workers()
        )
        ev.findings.extend(compared)
        vouched = _vouched_by(compared, own)
    for item, owner in hooks:
        ev.findings.append(item if vouched(item.file, owner) else metadata_only(item, owner))
    plugins = plugin_findings(
        dists, AUTOLOAD_GROUPS, scope.reference is not None, cache, _identity_in(stats)
    )
    ev.findings.extend(
        f for f in [*autoload_findings(dists), *plugins] if not vouched(f.file, ev.owner_of(f.file))
    )
    if scope.collect_digests:
        ev.all_digests = {
            p: (d.values[DEFAULT_ALGORITHM].hex(), d.size) for p, d in digests.items()
        }
    return ev
