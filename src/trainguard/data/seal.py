"""Seal a dataset (a folder, or a list of files) and verify it against its seal.

``seal_dataset`` splits every shard into samples (:mod:`.formats`), digests
each, and writes the signed manifest (a Sigstore bundle, :mod:`.manifest`)
and the sidecar of per-sample digests.  A shard that does not parse as its
format is refused, with every such shard named: a seal never covers data it
could not read.  ``verify_report`` returns every difference as a finding
(TG1522 for the dataset as a whole, TG1520 naming each changed sample);
``verify_dataset`` raises :class:`DataVerificationError` with them instead.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.data import manifest as mf
from trainguard.data.formats import (
    BY_NAME,
    Format,
    ShardError,
    format_of,
    open_shard,
    sample_digests,
)
from trainguard.errors import TrainguardError, UsageError
from trainguard.findings import Finding, Severity
from trainguard.rules import finding
from trainguard.signing import bundle as bundles
from trainguard.signing.errors import SealError, VerificationError
from trainguard.signing.keys import private_key_from, public_key_from

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey, PublicKey

SIGNATURE_NAME = ".trainguard-data.sig"
LEAVES_SUFFIX = ".leaves"
MAX_FILES = mf.MAX_SHARDS
MAX_LISTED = 20  # changed samples named one by one per shard; the rest are counted
HASH_CHUNK = 1024 * 1024
PROGRESS_EVERY = 4096  # samples between two progress updates inside a shard

Progress = Callable[[int, int], None]  # bytes done, bytes in all


class DataVerificationError(TrainguardError):
    """The dataset does not verify; ``findings`` says every way it does not."""

    def __init__(self, message: str, findings: list[Finding]) -> None:
        super().__init__(message)
        self.findings = findings


@dataclass
class DataSealResult:
    signature: Path
    leaves: Path
    manifest: mf.DataManifest


@dataclass
class DataVerifyResult:
    manifest: mf.DataManifest | None
    findings: list[Finding] = field(default_factory=list)
    shards_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings


def default_signature(root: Path) -> Path:
    """``DIR/.trainguard-data.sig``; for files, their folder's (a seal of files is written to
    their common folder)."""
    return (root if root.is_dir() else root.parent) / SIGNATURE_NAME


def leaves_path(signature: Path) -> Path:
    return signature.with_name(signature.name + LEAVES_SUFFIX)


def _files(root: Path, own: set[Path]) -> dict[str, Path]:
    """Every regular file under ``root`` by relative POSIX name; links are refused."""
    found: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise SealError(f"{path}: a symbolic link in the dataset (refused: it can move)")
            if name in names and stat.S_ISREG(mode) and path.resolve() not in own:
                found[path.relative_to(root).as_posix()] = path
            elif name in names and not stat.S_ISREG(mode):
                raise SealError(f"{path}: not a regular file")
            if len(found) > MAX_FILES:
                raise SealError(f"{root}: over {MAX_FILES} files")
    return found


def _shard_files(
    paths: Sequence[str | os.PathLike[str]], signature: Path | None
) -> tuple[Path, dict[str, Path]]:
    given = [Path(p) for p in paths]
    if not given:
        raise UsageError("nothing to seal: give a folder or files")
    for p in given:
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
    if len(given) == 1 and given[0].is_dir():
        root = given[0]
        sig = signature or default_signature(root)
        own = {sig.resolve(), leaves_path(sig).resolve()}
        return root, _files(root, own)
    if any(p.is_dir() for p in given):
        raise UsageError("give one folder, or files (not both)")
    root = Path(os.path.commonpath([p.resolve().parent for p in given]))
    return root, {p.resolve().relative_to(root).as_posix(): p for p in given}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digests(
    path: Path, fmt: Format, done: int, total: int, progress: Progress | None
) -> list[bytes]:
    """The shard's sample digests, the progress bar moving inside a large shard too."""
    reader = open_shard(str(path), fmt)
    size, out = path.stat().st_size, []
    try:
        for digest in reader.digests():
            out.append(digest)
            if progress is not None and len(out) % PROGRESS_EVERY == 0:
                progress(done + size * len(out) // max(reader.count, 1), total)
    except OSError as exc:
        raise ShardError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return out


def seal_dataset(
    paths: Sequence[str | os.PathLike[str]],
    key: str | os.PathLike[str] | PrivateKey,
    *,
    signature: str | os.PathLike[str] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> DataSealResult:
    """Sign a manifest of the dataset at ``paths`` (one folder, or shard files).

    Raises :class:`DataVerificationError` (TG1522 per shard) when a shard does not
    parse as its format: nothing is written then.
    """
    private = private_key_from(key)  # a bad key is an error before any hashing
    sig = Path(signature) if signature is not None else None
    root, files = _shard_files(paths, sig)
    sig = sig or default_signature(root)
    total = sum(p.stat().st_size for p in files.values())
    done = 0
    shards, leaves, refused = [], [], []
    for rel in sorted(files):
        path = files[rel]
        fmt = format_of(rel)
        try:
            digest = _sha256(path)
            per = _digests(path, fmt, done, total, progress)
        except ShardError as exc:
            refused.append(finding("TG1522", f"cannot be sealed: {exc}", file=rel))
            continue
        shards.append(
            mf.Shard(rel, fmt.name, path.stat().st_size, digest, len(per), mf.merkle_root(per))
        )
        leaves += per
        done += path.stat().st_size
        if progress is not None:
            progress(done, total)
    if refused:
        raise DataVerificationError(
            f"{len(refused)} shard(s) do not parse as their format; nothing sealed", refused
        )
    if len(leaves) > mf.MAX_SAMPLES:
        raise SealError(f"over {mf.MAX_SAMPLES} samples: seal the dataset in parts")
    sidecar = mf.leaves_file(leaves)
    manifest = mf.DataManifest(
        name or root.resolve().name,
        tuple(shards),
        hashlib.sha256(sidecar).hexdigest(),
        len(sidecar),
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    payload = manifest.payload()
    manifest.digest, manifest.leaves = hashlib.sha256(payload).hexdigest(), b"".join(leaves)
    lp = leaves_path(sig)
    tmp = lp.with_name(f".{lp.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(sidecar)
        os.replace(tmp, lp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SealError(f"{lp}: cannot write the leaves: {exc.strerror}") from None
    bundles.write_bundle(sig, bundles.build_bundle(payload, private))
    return DataSealResult(sig, lp, manifest)


def open_manifest(
    signature: str | os.PathLike[str], key: str | os.PathLike[str] | PublicKey
) -> mf.DataManifest:
    """The manifest and its leaves, once the signature and the sidecar verify.

    Raises :class:`VerificationError` (TG501/TG502 for the signature, TG1522 for
    a payload or sidecar that is not the signed one)."""
    sig = Path(signature)
    payload, _ = bundles.verify_bundle(bundles.read_bundle(sig), public_key_from(key))
    try:
        manifest = mf.parse(payload)
        lp = leaves_path(sig)
        with open(lp, "rb") as fh:
            data = fh.read(manifest.leaves_size + 1)
        mf.attach_leaves(manifest, data)
    except (mf.DataManifestError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        f = finding("TG1522", f"the dataset manifest cannot be used: {why}", file=str(sig))
        raise VerificationError(f.message, [f]) from None
    return manifest


def expected_finding(manifest: mf.DataManifest, expect: str | None, where: str) -> Finding | None:
    """TG1522 when the manifest is not of the dataset digest the user pinned.

    A signature proves who signed a manifest, not which version of the dataset it lists:
    a rolled-back folder with the older seal by the same key verifies.  The pin (the
    subject digest ``data seal`` printed) is the anchor."""
    if expect is None:
        return None
    pinned = expect.strip().lower().removeprefix("sha256:")
    if manifest.content == pinned:
        return None
    return finding(
        "TG1522",
        f"the seal lists dataset {manifest.content}, not the expected {pinned[:64]} (another "
        "dataset, or another version of it signed by the same key: a rollback)",
        file=where,
        evidence={"dataset": manifest.content, "expected": pinned[:64]},
    )


def check_expected(manifest: mf.DataManifest, expect: str | None, sig: Path) -> None:
    """Raise VerificationError (TG1522) when the manifest is not the pinned dataset."""
    f = expected_finding(manifest, expect, str(sig))
    if f is not None:
        raise VerificationError(f.message, [f])


def verify_report(
    path: str | os.PathLike[str],
    key: str | os.PathLike[str] | PublicKey,
    *,
    signature: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    expect_digest: str | None = None,
) -> DataVerifyResult:
    """Every way the dataset at ``path`` differs from its signed manifest, as findings
    (``expect_digest``: the dataset digest it must be, see :func:`expected_finding`)."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    sig = Path(signature) if signature is not None else default_signature(root)
    try:
        manifest = open_manifest(sig, key)
    except VerificationError as exc:
        return DataVerifyResult(None, list(exc.findings))
    base = root if root.is_dir() else root.parent
    result = DataVerifyResult(manifest)
    pinned = expected_finding(manifest, expect_digest, str(sig))
    if pinned is not None:
        result.findings.append(pinned)
    listed = {s.name for s in manifest.shards}
    if root.is_dir():
        try:
            present = _files(root, {sig.resolve(), leaves_path(sig).resolve()})
        except SealError as exc:
            result.findings.append(finding("TG1522", str(exc), file=str(root)))
            present = {}
        for rel in sorted(set(present) - listed):
            result.findings.append(
                finding("TG1522", "a file the dataset's seal does not list", file=rel)
            )
    total, done = sum(s.size for s in manifest.shards), 0
    for k, shard in enumerate(manifest.shards):
        result.findings += _check_shard(manifest, k, base / shard.name)
        result.shards_checked += 1
        done += shard.size
        if progress is not None:
            progress(done, total)
    return result


def _check_shard(manifest: mf.DataManifest, k: int, path: Path) -> list[Finding]:
    shard = manifest.shards[k]
    try:
        if not path.is_file() or path.is_symlink():
            return [finding("TG1522", "listed in the seal, missing or not a file", file=shard.name)]
        if path.stat().st_size == shard.size and _sha256(path) == shard.sha256:
            return []
        per = sample_digests(str(path), BY_NAME[shard.format])
    except (ShardError, OSError) as exc:
        return [
            finding("TG1522", f"changed, and unreadable as {shard.format}: {exc}", file=shard.name)
        ]
    sealed = manifest.shard_leaves(k)
    first = manifest.first(k)
    changed = [i for i in range(min(len(per), len(sealed))) if per[i] != sealed[i]]
    out = [
        finding(
            "TG1520",
            f"sample {first + i} ({manifest.where(first + i)}) differs from its sealed digest",
            file=shard.name,
            evidence={"sample": str(first + i), "shard": shard.name, "record": str(i)},
        )
        for i in changed[:MAX_LISTED]
    ]
    if len(changed) > MAX_LISTED:
        out.append(
            finding(
                "TG1520", f"and {len(changed) - MAX_LISTED} more changed samples", file=shard.name
            )
        )
    if len(per) != len(sealed):
        out.append(
            finding(
                "TG1522",
                f"holds {len(per)} samples, the seal {len(sealed)}",
                file=shard.name,
            )
        )
    if not out:
        # Training reads the same samples (digests are over values: another byte order or
        # dtype spelling, or bytes no sample reads), so not high; still said, since the
        # file is not the sealed one (re-seal it to make the shard's digest match again).
        out.append(
            finding(
                "TG1522",
                "its bytes differ from the sealed file's, every sample matches (re-written in "
                "another encoding, or holding bytes no sample reads)",
                file=shard.name,
                severity=Severity.MEDIUM,
            )
        )
    return out


def verify_dataset(
    path: str | os.PathLike[str],
    key: str | os.PathLike[str] | PublicKey,
    *,
    signature: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> DataVerifyResult:
    """Like :func:`verify_report`, but raises :class:`DataVerificationError` on any finding."""
    result = verify_report(path, key, signature=signature, progress=progress)
    if result.findings:
        first = result.findings[0]
        raise DataVerificationError(
            f"{path}: the dataset does not verify ({len(result.findings)} finding(s)), first "
            f"{first.rule} {first.file}: {first.message}",
            result.findings,
        )
    return result
