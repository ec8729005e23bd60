"""Verify a folder against its seal: every difference is a finding, never a traceback.

In order: the bundle and its signature (TG501/TG502), the expectations the
verifier brings from outside (name, minimum version, pinned manifest digest:
TG508/TG509), unsafe entries (TG507), version-control configuration
(TG511/TG512), ignored entries a loader would pick up (TG510), then the files:
those whose digest can matter are hashed (:mod:`trainguard.signing.bounds`),
the others judged by their size, and both sides compared (TG503-TG506).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.errors import UsageError
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.rules import rule
from trainguard.signing import bounds, freshness, ignored, vcs
from trainguard.signing import bundle as bundles
from trainguard.signing.build import (
    Progress,
    default_signature,
    hash_folder,
    relative_inside,
    split_ignores,
    verify_ignore_rules,
)
from trainguard.signing.compare import compare
from trainguard.signing.errors import VerificationError
from trainguard.signing.hashing import HashStats
from trainguard.signing.keyless import SigstoreIdentity
from trainguard.signing.keys import public_key_from
from trainguard.signing.manifest import Manifest, ManifestError, parse_statement
from trainguard.signing.tree import GIT_PATHS, IgnoreRules, unsafe_name, walk

if TYPE_CHECKING:
    from trainguard.digest_cache import DigestCache
    from trainguard.signing.keys import PublicKey

# What parsing attacker-written JSON, base64 and DER can raise beyond our own
# errors.  Caught around the signature stage only, and turned into TG502: a
# bundle we cannot read is a failed verification, never a crash (and never a pass).
_UNREADABLE = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RecursionError,
    OverflowError,
)


@dataclass
class VerifyResult:
    signature: Path
    report: ScanReport
    manifest: Manifest | None = None  # None when the signature itself did not verify
    signer_key_id: str = ""
    files_checked: int = 0
    stats: HashStats = field(default_factory=HashStats)
    notes: list[str] = field(default_factory=list)
    # Keyless signatures: "IDENTITY (ISSUER)" from the verified certificate.
    signer_identity: str | None = None
    manifest_digest: str = ""  # SHA-256 hex of the signed payload (what --expect-digest pins)
    hash_mode: str = ""  # how digests were obtained: full, cached (and what was refused), none


def _signature_result(sig_path: Path, findings: list[Finding]) -> FileResult:
    try:
        size = sig_path.stat().st_size
    except OSError:
        size = 0
    return FileResult(str(sig_path), "signature (Sigstore bundle)", size, findings)


def _finding(rule_id: str, message: str, file: str) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file)


def hash_mode(cache: object, full: bool, stats: HashStats) -> tuple[str, list[str]]:
    """The mode line for the output, and a note for each reason the cache was refused."""
    notes = [
        f"digest cache not used for {n} file{'' if n == 1 else 's'} on {why}: hashed afresh"
        for why, n in sorted(stats.cache_refused.items())
    ]
    if full:
        return "full: every file hashed afresh (--full)", notes
    if not cache:
        return "no cache: every file hashed afresh", notes
    refused = sum(stats.cache_refused.values())
    mode = f"cached: {stats.files_from_cache} digests from the digest cache"
    if refused:
        mode += f", {refused} hashed afresh where the filesystem cannot vouch for them"
    return mode, notes


def _open_signature(
    sig_path: Path, key: PublicKey | SigstoreIdentity
) -> tuple[Manifest, bundles.SignerInfo, str]:
    """The verified manifest, its signer and the payload's SHA-256; raises
    :class:`VerificationError` or :class:`ManifestError` otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm

    bundle = bundles.read_bundle(sig_path)
    try:
        if isinstance(key, SigstoreIdentity):
            from trainguard.signing.keyless import verify_bundle as verify_keyless

            payload, signer = verify_keyless(bundle, key)
        else:
            payload, signer = bundles.verify_bundle(bundle, key)
        return parse_statement(payload), signer, hashlib.sha256(payload).hexdigest()
    except (VerificationError, ManifestError):
        raise
    except (*_UNREADABLE, UnsupportedAlgorithm) as exc:
        # sigstore parses certificates and log entries itself, with its own surprises.
        raise ManifestError(f"unreadable ({type(exc).__name__})") from None


def verify_report(
    path: str | os.PathLike[str],
    key: str | os.PathLike[str] | PublicKey | SigstoreIdentity,
    *,
    signature: str | os.PathLike[str] | None = None,
    ignore: Sequence[str] = (),
    cache: DigestCache | bool = True,
    full: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    fail_on: Severity = Severity.HIGH,
    expect_name: str | None = None,
    min_version: str | None = None,
    expect_digest: str | None = None,
) -> VerifyResult:
    """Check ``path`` against its signature; every problem is a finding in ``.report``.

    ``ignore`` leaves paths and patterns out on both sides (the manifest's and
    the folder's).  ``expect_name``, ``min_version`` and ``expect_digest`` (the
    SHA-256 of the signed manifest) say which seal is expected: an older seal
    of the same key is reported as a rollback (TG508).  Raises
    (:class:`SealError`, :class:`UsageError`) only when the check could not be
    made: no signature file, a bad key or expectation, unreadable files.
    """
    root = Path(path)
    if not os.path.lexists(root):
        raise UsageError(f"{root}: no such file or directory")
    expect = freshness.Expectation(expect_name, min_version, expect_digest)
    verifier = key if isinstance(key, SigstoreIdentity) else public_key_from(key)
    sig_path = Path(signature) if signature is not None else default_signature(root)
    report = ScanReport(fail_on=fail_on)
    try:
        expected, signer, digest = _open_signature(sig_path, verifier)
    except VerificationError as exc:
        report.files.append(_signature_result(sig_path, exc.findings))
        return VerifyResult(sig_path, report)
    except ManifestError as exc:
        bad = _finding("TG502", f"the signed manifest is unusable: {exc}", str(sig_path))
        report.files.append(_signature_result(sig_path, [bad]))
        return VerifyResult(sig_path, report)
    sig_findings = freshness.check(expect, expected, digest, str(sig_path))
    report.files.append(_signature_result(sig_path, sig_findings))

    extra = IgnoreRules(*map(tuple, split_ignores(ignore)))
    tree = walk(os.fspath(root), verify_ignore_rules(root, sig_path, expected, extra))

    def shown(name: str) -> str:
        return str(root) if name == "." else str(root / name)

    findings = [
        _finding("TG507", f"{why}: not followed, so not verified", shown(name))
        for name, why in tree.unsafe
    ]
    if tree.single_file:
        findings += freshness.file_name(expected, root.name, str(root))
    notes: list[str] = []
    if not tree.single_file:
        vcs_findings, vcs_note = vcs.check(os.fspath(root), expected.info.vcs, str(root))
        findings += vcs_findings
        notes += [vcs_note] if vcs_note else []
        own = {relative_inside(root, sig_path), *GIT_PATHS}
        skipped = [n for n in [*tree.path_ignored, *tree.pattern_ignored] if n not in own]
        findings += ignored.findings(os.fspath(root), skipped, str(root))
    kept = []
    for r in expected.resources:
        why_unsafe = unsafe_name(r.path)
        if why_unsafe is not None:
            message = f"the signed manifest lists a path that is {why_unsafe}"
            findings.append(_finding("TG507", message, shown(r.path)))
        elif not extra.matches(r.path):
            kept.append(r)
    ser = expected.serialization
    empty_listed = expected.empty_files
    if empty_listed is not None:
        empty_listed = tuple(e for e in empty_listed if unsafe_name(e) is None)
    expected = Manifest(expected.model_name, ser, kept, empty_listed, expected.info)
    display = {
        n: shown(n) for n in {r.path for r in kept} | set(empty_listed or ()) | set(tree.files)
    }
    sizes = {shown(n): e.identity.size for n, e in tree.files.items()}
    checked = len(tree.files)

    # Only what can change the verdict is hashed; the rest is judged by size.
    todo = bounds.plan(tree.files, expected, display)
    findings += todo.findings
    tree.files = todo.hash
    resources, stats, cache_notes = hash_folder(tree, ser, cache, full, workers, progress)
    mode, refused = hash_mode(cache, full, stats)
    actual = Manifest(expected.model_name, ser, resources)
    empty = frozenset(n for n, e in tree.files.items() if e.identity.size == 0 and ser.shard_size)
    # A listed file judged by its size is absent from ``actual``: compare sees it
    # gone (so its sealed content can still explain a rename) and would call it
    # removed, which the size finding (TG503) already says better.
    judged = {display[n] for n in todo.unhashed_listed}
    findings += [
        f
        for f in compare(expected, actual, display, empty)
        if not (f.rule == "TG505" and f.file in judged)
    ]

    by_file: dict[str, list[Finding]] = {}
    for f in findings:
        by_file.setdefault(f.file, []).append(f)
    for name in sorted({*display.values(), *by_file}):
        # Findings also name folders (an ignored checkpoint-N, a link): say which.
        kind = "file" if name in sizes or not os.path.isdir(name) else "folder"
        report.files.append(FileResult(name, kind, sizes.get(name, 0), by_file.get(name, [])))
    return VerifyResult(
        sig_path,
        report,
        expected,
        signer.key_id,
        checked,
        stats,
        [*cache_notes, *refused, *notes],
        signer.certificate_subject if isinstance(key, SigstoreIdentity) else None,
        digest,
        mode,
    )
