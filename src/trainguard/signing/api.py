"""Seal a model folder (or file) and verify it: the library behind the CLI.

``seal`` walks the folder, hashes every file (digests of unchanged files come
from the digest cache), signs the manifest (with the release's name, version
and time, and the digests of version-control hooks and configuration) and
writes a Sigstore bundle.  ``verify_report``
(:mod:`trainguard.signing.verifying`) returns every difference as findings in
a :class:`ScanReport`; ``verify`` raises :class:`VerificationError` with
those findings instead.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.digest_cache import DigestCache
from trainguard.errors import UsageError
from trainguard.signing import bundle as bundles
from trainguard.signing import ignored as ignored_entries
from trainguard.signing import vcs
from trainguard.signing.build import (
    Progress,
    default_signature,
    hash_folder,
    relative_inside,
    split_ignores,
)
from trainguard.signing.dsse import MAX_PAYLOAD
from trainguard.signing.errors import SealError, VerificationError
from trainguard.signing.freshness import version_key
from trainguard.signing.hashing import SEAL_HASHES, HashStats
from trainguard.signing.keyless import KeylessSigning, SigstoreIdentity
from trainguard.signing.keys import private_key_from
from trainguard.signing.manifest import MAX_INFO_TEXT, Manifest, SealInfo, Serialization
from trainguard.signing.tree import GIT_PATHS, IgnoreRules, walk
from trainguard.signing.verifying import VerifyResult, hash_mode, verify_report

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey, PublicKey

__all__ = ["SealResult", "VerifyResult", "default_signature", "seal", "verify", "verify_report"]


@dataclass
class SealResult:
    signature: Path
    manifest: Manifest
    stats: HashStats
    notes: list[str] = field(default_factory=list)  # e.g. why the digest cache was off
    manifest_digest: str = ""  # SHA-256 hex of the signed payload: pin it with expect_digest
    hash_mode: str = ""


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
    name: str | None = None,
    version: str | None = None,
) -> SealResult:
    """Sign a manifest of ``path`` and write it as a Sigstore bundle (model-signing v1).

    ``shard_size`` hashes files in shards of that many bytes (model-signing's
    "shards" serialization), so that a change is located to a shard.
    ``ignore`` takes paths relative to the folder and glob patterns; ``.git``
    (and git's other files) and the signature itself are always left out.
    ``cache=False`` or ``full=True`` hash every file afresh.  ``name`` and
    ``version`` (a dotted number such as ``3`` or ``1.4.2``) say which release
    this is, so that ``verify(..., expect_name=, min_version=)`` can tell an
    older seal of the same key (a rollback) from this one.
    """
    if hash not in SEAL_HASHES:
        raise UsageError(f"unsupported hash {hash!r} (expected one of: {', '.join(SEAL_HASHES)})")
    for what, text in (("name", name), ("version", version)):
        if text is not None and not (0 < len(text) <= MAX_INFO_TEXT and text.isprintable()):
            raise UsageError(f"the {what} must be 1-{MAX_INFO_TEXT} printable characters")
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
    resources, stats, notes = hash_folder(tree, ser, cache, full, workers, progress)
    mode, refused = hash_mode(cache, full, stats)
    notes += refused
    if version is not None and version_key(version) is None:
        notes.append(
            f"version {version!r} is not a dotted number (7, 1.4.2): verify --min-version "
            "will refuse to compare it (TG508)"
        )
    if not tree.single_file:
        own = {sig_rel, *GIT_PATHS}
        skipped = [n for n in [*tree.path_ignored, *tree.pattern_ignored] if n not in own]
        for f in ignored_entries.findings(os.fspath(root), skipped, str(root)):
            notes.append(f"{f.file}: {f.message}")
    empty = tuple(n for n, e in tree.files.items() if e.identity.size == 0) if shard_size else None
    info = SealInfo(
        name=name,
        version=version,
        sealed_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        vcs=None if tree.single_file else vcs.record(os.fspath(root)),
    )
    # A single file's seal names the file, as model-signing does (its subject is
    # the file's name): verify then refuses these bytes and this signature moved
    # under another name.  The release's name stays in ``info.name``.
    subject = root.name if tree.single_file else (name or root.resolve().name)
    manifest = Manifest(subject, ser, resources, empty, info)
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
    digest = hashlib.sha256(payload).hexdigest()
    return SealResult(sig_path, manifest, stats, notes, digest, mode)


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
    expect_name: str | None = None,
    min_version: str | None = None,
    expect_digest: str | None = None,
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
        expect_name=expect_name,
        min_version=min_version,
        expect_digest=expect_digest,
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
