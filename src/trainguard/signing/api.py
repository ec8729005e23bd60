"""Seal a model folder (or file) and verify it: the library behind the CLI.

``seal`` walks the folder, hashes every file (digests of unchanged files come
from the digest cache), signs the manifest and writes a Sigstore bundle.
``verify_report`` checks the bundle's signature with the public key, hashes
the folder the way the manifest says it was hashed, and returns every
difference as findings in a :class:`ScanReport`; ``verify`` raises
:class:`VerificationError` with those findings instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.digest_cache import DigestCache
from trainguard.errors import UsageError
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.rules import rule
from trainguard.signing import bundle as bundles
from trainguard.signing.build import (
    Progress,
    default_signature,
    hash_tree,
    open_cache,
    relative_inside,
    split_ignores,
    verify_ignore_rules,
)
from trainguard.signing.compare import compare
from trainguard.signing.dsse import MAX_PAYLOAD
from trainguard.signing.errors import SealError, VerificationError
from trainguard.signing.hashing import SEAL_HASHES, HashStats
from trainguard.signing.keyless import KeylessSigning, SigstoreIdentity
from trainguard.signing.keys import private_key_from, public_key_from
from trainguard.signing.manifest import (
    Manifest,
    ManifestError,
    Resource,
    Serialization,
    parse_statement,
)
from trainguard.signing.tree import GIT_PATHS, IgnoreRules, Tree, unsafe_name, walk

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey, PublicKey

__all__ = ["SealResult", "VerifyResult", "default_signature", "seal", "verify", "verify_report"]


@dataclass
class SealResult:
    signature: Path
    manifest: Manifest
    stats: HashStats
    notes: list[str] = field(default_factory=list)  # e.g. why the digest cache was off


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


def _hash(
    tree: Tree,
    ser: Serialization,
    cache: DigestCache | bool,
    full: bool,
    workers: int | None,
    progress: Progress | None,
) -> tuple[list[Resource], HashStats, list[str]]:
    stats = HashStats()
    opened = open_cache(cache, tree.root)
    try:
        resources = hash_tree(
            tree, ser, opened, full=full, workers=workers, progress=progress, stats=stats
        )
    finally:
        if opened is not None:
            opened.close()
    notes = [opened.disabled] if opened is not None and opened.disabled else []
    return resources, stats, notes


def seal(
    path: str | os.PathLike[str],
    key: str | os.PathLike[str] | PrivateKey | KeylessSigning,
    *,
    signature: str | os.PathLike[str] | None = None,
    hash: str = "sha256",
    shard_size: int | None = None,
    ignore: Sequence[str] = (),
    cache: DigestCache | bool = True,
    full: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> SealResult:
    """Sign a manifest of ``path`` and write it as a Sigstore bundle (model-signing v1).

    ``shard_size`` hashes files in shards of that many bytes (model-signing's
    "shards" serialization), so that a change is located to a shard.
    ``ignore`` takes paths relative to the folder and glob patterns; ``.git``
    (and git's other files) and the signature itself are always left out.
    ``cache=False`` or ``full=True`` hash every file afresh.
    """
    if hash not in SEAL_HASHES:
        raise UsageError(f"unsupported hash {hash!r} (expected one of: {', '.join(SEAL_HASHES)})")
    if shard_size is not None and shard_size <= 0:
        raise UsageError("the shard size must be a positive number of bytes")
    if shard_size is not None and hash != "sha256":
        # model-signing hashes blake3 by whole files even when asked for shards,
        # so it could not verify such a manifest; BLAKE3 is parallel on its own.
        raise UsageError("--shard-size needs --hash sha256 (model-signing never shards blake3)")
    root = Path(path)
    if not os.path.lexists(root):
        raise UsageError(f"{root}: no such file or directory")
    if not isinstance(key, KeylessSigning):
        private_key_from(key)  # a bad key is an error before any hashing
    sig_path = Path(signature) if signature is not None else default_signature(root)
    paths, patterns = split_ignores(ignore)
    sig_rel = relative_inside(root, sig_path)
    rules = IgnoreRules(
        tuple(dict.fromkeys([*GIT_PATHS, *([sig_rel] if sig_rel else []), *paths])),
        tuple(patterns),
    )
    tree = walk(os.fspath(root), rules)
    if tree.unsafe:
        listed = "; ".join(f"{name}: {why}" for name, why in tree.unsafe[:10])
        more = f" (and {len(tree.unsafe) - 10} more)" if len(tree.unsafe) > 10 else ""
        raise SealError(f"refusing to seal {root}: {listed}{more}")
    # Files a pattern matched are listed by name as well, so that model-signing,
    # which knows no patterns, leaves them out too.
    ignored = tuple(dict.fromkeys([*rules.paths, *tree.pattern_ignored]))
    method = "shards" if shard_size else "files"
    ser = Serialization(method, hash, shard_size or 0, False, ignored, tuple(patterns))
    resources, stats, notes = _hash(tree, ser, cache, full, workers, progress)
    empty = tuple(n for n, e in tree.files.items() if e.identity.size == 0) if shard_size else None
    manifest = Manifest(root.resolve().name, ser, resources, empty)
    payload = manifest.payload()
    if len(payload) > MAX_PAYLOAD:
        # verify would refuse it: better to say so now than after the fact.
        raise SealError(
            f"the manifest of {root} is {len(payload)} bytes, over the {MAX_PAYLOAD} a "
            "signature may carry: seal sub-folders separately, or use fewer shards"
        )
    if isinstance(key, KeylessSigning):
        from trainguard.signing.keyless import sign_keyless

        bundle = sign_keyless(payload, identity_token=key.identity_token, staging=key.staging)
    else:
        bundle = bundles.build_bundle(payload, private_key_from(key))
    bundles.write_bundle(sig_path, bundle)
    return SealResult(sig_path, manifest, stats, notes)


def _signature_result(sig_path: Path, findings: list[Finding]) -> FileResult:
    try:
        size = sig_path.stat().st_size
    except OSError:
        size = 0
    return FileResult(str(sig_path), "signature (Sigstore bundle)", size, findings)


def _finding(rule_id: str, message: str, file: str) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file)


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
) -> VerifyResult:
    """Check ``path`` against its signature; every problem is a finding in ``.report``.

    ``ignore`` leaves paths and patterns out on both sides (the manifest's and
    the folder's).  Raises (:class:`SealError`, :class:`UsageError`) only when
    the check could not be made: no signature file, a bad key, unreadable files.
    """
    root = Path(path)
    if not os.path.lexists(root):
        raise UsageError(f"{root}: no such file or directory")
    public = None if isinstance(key, SigstoreIdentity) else public_key_from(key)
    sig_path = Path(signature) if signature is not None else default_signature(root)
    report = ScanReport(fail_on=fail_on)
    try:
        bundle = bundles.read_bundle(sig_path)
        if isinstance(key, SigstoreIdentity):
            from trainguard.signing.keyless import verify_bundle as verify_keyless

            payload, signer = verify_keyless(bundle, key)
        else:
            assert public is not None
            payload, signer = bundles.verify_bundle(bundle, public)
        expected = parse_statement(payload)
    except VerificationError as exc:
        report.files.append(_signature_result(sig_path, exc.findings))
        return VerifyResult(sig_path, report)
    except ManifestError as exc:
        bad = _finding("TG502", f"the signed manifest is unusable: {exc}", str(sig_path))
        report.files.append(_signature_result(sig_path, [bad]))
        return VerifyResult(sig_path, report)
    report.files.append(_signature_result(sig_path, []))

    extra = IgnoreRules(*map(tuple, split_ignores(ignore)))
    tree = walk(os.fspath(root), verify_ignore_rules(root, sig_path, expected, extra))

    def shown(name: str) -> str:
        return str(root) if name == "." else str(root / name)

    findings = [
        _finding("TG507", f"{why}: not followed, so not verified", shown(name))
        for name, why in tree.unsafe
    ]
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
    expected = Manifest(expected.model_name, ser, kept, empty_listed)
    resources, stats, notes = _hash(tree, ser, cache, full, workers, progress)
    actual = Manifest(expected.model_name, ser, resources)
    listed = {r.path for r in kept} | set(empty_listed or ())
    display = {n: shown(n) for n in listed | set(tree.files)}
    empty = frozenset(n for n, e in tree.files.items() if e.identity.size == 0 and ser.shard_size)
    findings += compare(expected, actual, display, empty)

    by_file: dict[str, list[Finding]] = {}
    for f in findings:
        by_file.setdefault(f.file, []).append(f)
    sizes = {shown(n): e.identity.size for n, e in tree.files.items()}
    for name in sorted({*display.values(), *by_file}):
        report.files.append(FileResult(name, "file", sizes.get(name, 0), by_file.get(name, [])))
    return VerifyResult(
        sig_path,
        report,
        expected,
        signer.key_id,
        len(tree.files),
        stats,
        notes,
        signer.certificate_subject if isinstance(key, SigstoreIdentity) else None,
    )


def verify(
    path: str | os.PathLike[str],
    key: str | os.PathLike[str] | PublicKey | SigstoreIdentity,
    *,
    signature: str | os.PathLike[str] | None = None,
    ignore: Sequence[str] = (),
    cache: DigestCache | bool = True,
    full: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Like :func:`verify_report`, but raises :class:`VerificationError` on failure.

    Failure means a finding at high or above; the result's report keeps the
    lower ones (an empty file that a shards manifest could not list).
    """
    result = verify_report(
        path,
        key,
        signature=signature,
        ignore=ignore,
        cache=cache,
        full=full,
        workers=workers,
        progress=progress,
    )
    if result.report.failed:
        failing = [f for f in result.report.findings if f.severity >= result.report.fail_on]
        first = failing[0]
        raise VerificationError(
            f"{path}: verification failed with {len(failing)} finding"
            f"{'' if len(failing) == 1 else 's'}, first {first.rule} {first.location}: "
            f"{first.message}",
            result.report.findings,
        )
    return result
