"""Verify an installed Python environment: ``trainguard env verify``.

Every installed distribution's files are hashed and compared with its RECORD;
files no RECORD lists, ``.pth`` files that run code, ``sitecustomize`` and
``usercustomize``, and compiled files that differ from their source are
reported; with a signed snapshot, every file is also compared with the digest
it had when the snapshot was taken.  Nothing found is imported or executed:
files are read, hashed and (for the pyc check) compiled.

The result is a :class:`~trainguard.findings.ScanReport` with one
:class:`~trainguard.findings.FileResult` per distribution (clean ones too, so
the JSON report says what was checked) and one per file that no distribution
owns and that carries a finding.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import time
from dataclasses import dataclass, field

from trainguard.digest_cache import DigestCache
from trainguard.env.allow import DEFAULTS, AllowEntry, apply_allowlist
from trainguard.env.digests import Progress
from trainguard.env.gather import EnvStats, Evidence, gather
from trainguard.env.snapshot import Snapshot, read_snapshot
from trainguard.env.sort import Scope
from trainguard.env.syspath import path_roots
from trainguard.env.verdict import (
    DistSummary,
    Observed,
    Verdict,
    consistent,
    observe,
    options_tag,
    outside_settled,
    reusable,
    to_doc,
    variant_of,
)
from trainguard.env.walk import startup_search_path
from trainguard.env.wheels import Reference
from trainguard.errors import UsageError
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.signing.keys import public_key_from


@dataclass
class EnvOptions:
    paths: list[str] | None = None  # site folders; None: the running interpreter's
    search_path: list[str] | None = None  # where customize modules are looked for
    check_pyc: bool = True
    stdlib: bool = False  # also compare the standard library's pycs with their source
    allowlist: list[AllowEntry] = field(default_factory=lambda: list(DEFAULTS))
    cache: DigestCache | None = None
    workers: int | None = None
    against: Snapshot | None = None
    against_label: str = ""
    # Wheels and a lock file to compare every installed file with (see env.reference).
    reference: Reference | None = None
    collect_digests: bool = False  # keep every file's sha256 (for a snapshot)
    fail_on: Severity = Severity.HIGH
    progress: Progress | None = None


@dataclass
class EnvResult:
    report: ScanReport
    stats: EnvStats
    # path -> (sha256 hex, size) of every file, when ``collect_digests``.
    digests: dict[str, tuple[str, int]] = field(default_factory=dict)


def _sys_path_rank(folder: str) -> int:
    real = os.path.realpath(folder)
    for i, entry in enumerate(sys.path):
        if entry and os.path.realpath(entry) == real:
            return i
    return len(sys.path)


def default_roots() -> list[str]:
    """The running interpreter's site folders (purelib, platlib, user site), in
    the order ``sys.path`` searches them."""
    candidates: list[str] = []
    getsitepackages = getattr(site, "getsitepackages", None)
    if getsitepackages is not None:
        candidates.extend(getsitepackages())
    paths = sysconfig.get_paths()
    candidates.extend([paths["purelib"], paths["platlib"]])
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    return resolve_roots(candidates, must_exist=False)


def resolve_roots(paths: list[str], *, must_exist: bool = True) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for path in paths:
        folder = os.path.normpath(os.path.abspath(path))
        if not os.path.isdir(folder):
            if must_exist:
                raise UsageError(f"{path}: not a folder")
            continue
        real = os.path.realpath(folder)
        if real not in seen:
            seen.add(real)
            out.append(folder)
    if not must_exist:
        out.sort(key=_sys_path_rank)
    return out


def target_roots(paths: list[str] | None, against: Snapshot | None = None) -> list[str]:
    """The folders a verify looks at: ``paths``, else the snapshot's, else this
    interpreter's site folders."""
    if paths:
        return resolve_roots(paths)
    if against is not None:
        return resolve_roots(against.roots, must_exist=False)
    return default_roots()


def _format_of(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".pth"):
        return "site .pth file"
    if name.endswith(".pyc"):
        return "compiled Python"
    if name.endswith(".py"):
        return "Python source"
    return "file"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _verdict_of(evidence: Evidence) -> Verdict:
    owners: dict[str, str] = {}
    for item in evidence.findings:
        if item.file not in owners:
            owner = evidence.owner_of(item.file)
            if owner is not None:
                owners[item.file] = owner.meta_dir
    dists = [
        DistSummary(
            d.meta_dir,
            f"distribution {d.label}" + ("" if d.has_record else ", no RECORD"),
            sum(e.size or 0 for e in d.entries),
            evidence.unreadable.get(d.meta_dir, []),
        )
        for d in evidence.dists
    ]
    return Verdict(
        dists=dists,
        findings=evidence.findings,
        owners=owners,
        file_errors=evidence.file_errors,
        walk_errors=evidence.walk_errors,
        files=evidence.stats.files,
        pycs_checked=evidence.stats.pycs_checked,
    )


def _report(verdict: Verdict, findings: list[Finding], fail_on: Severity) -> ScanReport:
    by_owner: dict[str, list[Finding]] = {d.meta_dir: [] for d in verdict.dists}
    loose: dict[str, list[Finding]] = {}
    for item in findings:
        owner = verdict.owners.get(item.file)
        if owner is not None and owner in by_owner:
            by_owner[owner].append(item)
        else:
            loose.setdefault(item.file, []).append(item)
    files: list[FileResult] = []
    for dist in verdict.dists:
        error = None
        if dist.unreadable:
            error = f"{len(dist.unreadable)} listed file(s) could not be read: " + "; ".join(
                dist.unreadable[:3]
            )
        files.append(
            FileResult(dist.meta_dir, dist.kind, dist.size, by_owner[dist.meta_dir], error)
        )
    for path in sorted({*loose, *verdict.file_errors}):
        files.append(
            FileResult(
                path,
                _format_of(path),
                _size(path),
                loose.get(path, []),
                verdict.file_errors.get(path),
            )
        )
    for folder, reason in sorted(verdict.walk_errors.items()):
        files.append(FileResult(folder, "folder", 0, [], f"cannot be listed: {reason}"))
    return ScanReport(files=files, fail_on=fail_on)


def stdlib_folders() -> list[str]:
    """The running interpreter's standard library folders (lib-dynload included)."""
    paths = sysconfig.get_paths()
    found: list[str] = []
    for candidate in (paths["stdlib"], paths["platstdlib"]):
        folder = os.path.normpath(candidate)
        if os.path.isdir(folder) and not any(
            folder == f or folder.startswith(f + os.sep) for f in found
        ):
            found = [f for f in found if not f.startswith(folder + os.sep)] + [folder]
    return found


def verify_environment(options: EnvOptions | None = None) -> EnvResult:
    """Check the environment; the verdict is in the returned report's findings."""
    opts = options or EnvOptions()
    started = time.perf_counter()
    roots = target_roots(opts.paths, opts.against)
    # What the .pth files put on sys.path is a root like the site folders: customize
    # modules there run at start-up too (a running interpreter's sys.path has them).
    added, _ = path_roots(roots)
    if opts.search_path is not None:
        search = opts.search_path
    elif opts.paths:
        search = [*roots, *(r.path for r in added if not r.is_file)]
    else:
        search = startup_search_path()
        search += [r.path for r in added if not r.is_file and r.path not in search]
    stdlib: list[str] = []
    if opts.against is not None and opts.against.stdlib:
        stdlib = list(opts.against.stdlib)  # a snapshot that covers it is checked in full
    elif opts.stdlib:
        stdlib = stdlib_folders()
    scope = Scope(
        roots=roots,
        search=search,
        stdlib=stdlib,
        check_pyc=opts.check_pyc,
        workers=opts.workers,
        collect_digests=opts.collect_digests,
        against=opts.against,
        against_label=opts.against_label,
        reference=opts.reference,
        path_roots=tuple(added),
    )
    observed: Observed | None = None
    tag = options_tag(scope)
    if (
        opts.cache is not None
        and opts.against is None
        and opts.reference is None
        and not opts.collect_digests
    ):
        observed = observe(scope)  # before anything is read: see env_verdict
        previous = reusable(opts.cache.read_verdict(variant_of(tag)), tag, observed)
        if previous is not None:
            stats = EnvStats(
                roots=list(roots),
                stdlib=stdlib,
                distributions=len(previous.dists),
                files=previous.files,
                reused_from=previous.made_at,
            )
            findings = apply_allowlist(previous.findings, opts.allowlist)
            report = _report(previous, findings, opts.fail_on)
            stats.seconds = time.perf_counter() - started
            return EnvResult(report, stats)
    evidence = gather(scope, opts.cache, opts.progress, observed)
    verdict = _verdict_of(evidence)
    if opts.cache is not None:
        opts.cache.save()
        # A read error may be passing: the next verify looks again rather than repeat it.
        failed = evidence.file_errors or evidence.unreadable or evidence.walk_errors
        if (
            observed is not None
            and observed.digest is not None
            and observed.settled
            and outside_settled(evidence.outside, observed.taken_at)
            and consistent(
                observed, evidence.reads, evidence.outside, (d.meta_dir for d in evidence.dists)
            )
            and not failed
        ):
            doc = to_doc(tag, observed, evidence.outside, verdict)
            opts.cache.write_verdict(variant_of(tag), doc)
    findings = apply_allowlist(evidence.findings, opts.allowlist)
    report = _report(verdict, findings, opts.fail_on)
    stats = evidence.stats
    stats.stdlib = stdlib
    stats.seconds = time.perf_counter() - started
    stats.cache_hits = opts.cache.hits if opts.cache is not None else 0
    return EnvResult(report, stats, evidence.all_digests)


def check_against(
    snapshot: str | os.PathLike[str], key: object, paths: list[str] | None = None
) -> list[Finding]:
    """What in the environment differs from a sealed snapshot, at high or above.

    ``key`` is the public key that signed the snapshot (an object or a PEM path);
    a snapshot that does not verify raises.  ``protect(env_snapshot=...)`` and
    the start-up check of ``watch(env_snapshot=...)`` both come here, so the two
    refuse the same environments.  Pycs are left out: a snapshot covers them
    by digest already, and the check must stay quick at start-up.
    """
    if key is None:
        raise UsageError("env_snapshot needs env_key, the public key that signed the snapshot")
    sealed = read_snapshot(os.fspath(snapshot), public_key_from(key))
    result = verify_environment(EnvOptions(paths=paths, against=sealed, check_pyc=False))
    return [f for f in result.report.findings if f.severity >= Severity.HIGH]
