"""A trust policy at load: only bytes a trusted signer sealed are loaded.

``protect(trust="trust.toml")``, ``load(..., trust=...)`` and
``TRAINGUARD_TRUST=trust.toml``.  A checkpoint loads only if the seals
covering it (``FILE.sig``, ``model.sig`` in its folder or a folder above, a
signature the policy names) verify against a key or Sigstore identity the
policy trusts, and the digest of the very bytes handed to the loader (already
in memory) equals the digest in those signed manifests.  A file swapped or edited after the check
changes nothing: the loader never reads the file again.

The signature and the manifest are checked by :mod:`trainguard.signing`
(``read_bundle``, ``verify_bundle``, ``parse_statement``); only the digest of
the loaded bytes is computed here, since those bytes exist only here.

Every seal that covers the path (:mod:`trainguard.loader.trustseals`) must
verify and list these bytes under the path's name: one failing seal refuses
the load, and no other seal outvotes it.  A single-file seal (``FILE.sig``)
names its file, so a file's bytes and signature copied under another name are
refused.  The most specific seal decides, and the policy's expectations
(``expect_name``, ``min_version``, pinned manifest digests) apply to it.

Minimal file::

    [trust]
    keys = ["signer.pub"]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.errors import PolicyError, UnsafeModelError, UsageError
from trainguard.findings import Finding
from trainguard.loader.trustseals import SIGNATURE_NAME, Covering, covering_seals, pinned_roots
from trainguard.rules import finding
from trainguard.signing import freshness
from trainguard.signing.errors import KeyLoadError, SealError, VerificationError
from trainguard.signing.keyless import SigstoreIdentity
from trainguard.signing.tree import GIT_PATHS, IgnoreRules

_KEYS = frozenset(
    ["keys", "identities", "signatures", "in_memory", "expect_name", "min_version", "pins"]
)


@dataclass(frozen=True)
class TrustPolicy:
    keys: tuple[Any, ...]  # public keys
    identities: tuple[SigstoreIdentity, ...]
    # Seals kept apart from what they cover: (the sealed folder or file, its signature).
    signatures: tuple[tuple[Path, Path], ...]
    in_memory: str  # "refuse" (default) or "allow": bytes that no file backs
    origin: str
    # What the deciding seal must say (release name, minimum version), and
    # manifest digests pinned per sealed folder or file.
    expect: freshness.Expectation = field(default_factory=freshness.Expectation)
    pins: tuple[tuple[Path, str], ...] = ()


def load_trust(path: str | os.PathLike[str]) -> TrustPolicy:
    """Read a trust policy; every problem is reported at once (:class:`PolicyError`)."""
    from trainguard.signing.keys import load_public_key

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    where = Path(path)
    try:
        doc = tomllib.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{where}: cannot read the trust policy: {exc}") from exc
    table = doc.get("trust")
    errors: list[str] = []
    if not isinstance(table, dict) or set(doc) != {"trust"}:
        raise PolicyError(f"{where}: a trust policy is one [trust] table")
    errors += [f"unknown setting {k!r}" for k in sorted(set(table) - _KEYS)]
    base = where.parent
    keys = []
    for name in _strings(table, "keys", errors):
        try:
            keys.append(load_public_key(base / name))
        except (KeyLoadError, OSError) as exc:
            errors.append(f"key {name}: {exc}")
    identities = []
    raw_ids = table.get("identities", [])
    for item in raw_ids if isinstance(raw_ids, list) else [None]:
        if isinstance(item, dict) and {"identity", "issuer"} == set(item):
            identities.append(SigstoreIdentity(str(item["identity"]), str(item["issuer"])))
        else:
            errors.append('identities: each is {identity = "...", issuer = "..."}')
    raw_sigs = table.get("signatures", {})
    if not isinstance(raw_sigs, dict) or not all(isinstance(v, str) for v in raw_sigs.values()):
        errors.append('signatures: a table of "sealed folder" = "its signature"')
        raw_sigs = {}
    signatures = tuple((base / root, base / sig) for root, sig in raw_sigs.items())
    raw_pins = table.get("pins", {})
    if not isinstance(raw_pins, dict) or not all(isinstance(v, str) for v in raw_pins.values()):
        errors.append('pins: a table of "sealed folder or file" = "manifest sha256"')
        raw_pins = {}
    expect = freshness.Expectation()
    wanted = _text(table, "expect_name", errors), _text(table, "min_version", errors)
    try:
        expect = freshness.Expectation(*wanted)
    except UsageError as exc:
        errors.append(str(exc))
    for digest in raw_pins.values():  # each on its own: every problem reported at once
        try:
            freshness.Expectation(digest=digest)
        except UsageError as exc:
            errors.append(f"pins: {exc}")
    pins = tuple((base / root, digest.lower()) for root, digest in raw_pins.items())
    in_memory = table.get("in_memory", "refuse")
    if in_memory not in ("refuse", "allow"):
        errors.append("in_memory: 'refuse' or 'allow'")
    if not keys and not identities and not errors:
        errors.append("no trusted keys or identities: nothing could ever load")
    if errors:
        raise PolicyError(f"{where}: " + "; ".join(errors))
    return TrustPolicy(
        tuple(keys), tuple(identities), signatures, str(in_memory), str(where), expect, pins
    )


def _text(table: dict[str, Any], name: str, errors: list[str]) -> str | None:
    value = table.get(name)
    if value is not None and not isinstance(value, str):
        errors.append(f"{name}: a string")
        return None
    return value


def _strings(table: dict[str, Any], name: str, errors: list[str]) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{name}: a list of paths")
        return []
    return value


def trust_from(value: Any) -> TrustPolicy | None:
    """A policy from a path, an already-read policy, or None (no trust check)."""
    if value is None or isinstance(value, TrustPolicy):
        return value
    return load_trust(value)


def _refused(source: str, rule_id: str, message: str) -> UnsafeModelError:
    return UnsafeModelError(source, [finding(rule_id, message, file=source)])


def check_in_memory(policy: TrustPolicy, source: str) -> None:
    """Bytes that no file backs: no seal can cover them."""
    if policy.in_memory != "allow":
        raise _refused(
            source,
            "TG504",
            "not read from a file, so no seal can vouch for it (trust policy "
            f'{policy.origin}; in_memory = "allow" loads such bytes unsealed)',
        )


def check_bytes(policy: TrustPolicy, path: str | os.PathLike[str], data: bytes) -> None:
    """Raise :class:`UnsafeModelError` unless every seal covering ``path`` is a
    trusted seal of ``data`` under that name and the deciding one is fresh."""
    source = os.fspath(path)
    seals = covering_seals(source, policy.signatures)
    reasons: list[Finding] = []
    digests: dict[Path, set[str]] = {}  # sealed root -> manifest digests, for the pins
    deciding = True
    for seal in seals:
        try:
            manifest, digest = _verified_manifest(policy, seal.sig)
        except VerificationError as exc:
            reasons += [
                finding(f.rule, f"{seal.sig}: {f.message}", file=source) for f in exc.findings[:1]
            ]
            deciding = False
            continue
        if not seal.single and _ignored(manifest, seal.rel):
            continue  # the signer left it out of this folder's seal: not covered by it
        digests.setdefault(seal.root, set()).add(digest)
        reasons += _judge(policy, seal, manifest, digest, data, source, deciding)
        deciding = False
    for sealed, digest, roots in pinned_roots(source, policy.pins):
        if not any(digest in digests.get(r, ()) for r in roots):
            have = next((min(digests[r]) for r in roots if r in digests), None)
            what = f"its seal's manifest is {have[:16]}..." if have else "no seal of it verified"
            message = f"{sealed} is pinned to manifest {digest[:16]}... by {policy.origin}: {what}"
            reasons.append(finding("TG508", message, file=source))
    if not digests and not reasons:
        reasons.append(
            finding(
                "TG504",
                f"no seal covers it (no {SIGNATURE_NAME} in its folder or above, none named by "
                f"the trust policy {policy.origin} lists it)",
                file=source,
            )
        )
    if reasons:
        raise UnsafeModelError(source, reasons)


def _judge(
    policy: TrustPolicy,
    seal: Covering,
    manifest: Any,
    digest: str,
    data: bytes,
    source: str,
    deciding: bool,
) -> list[Finding]:
    """Why this verified seal does not vouch for ``data`` at ``source`` (empty: it does)."""
    out: list[Finding] = []
    if seal.single:
        for f in freshness.file_name(manifest, seal.root.name, source):
            out.append(finding(f.rule, f"{seal.sig}: {f.message}", file=source))
    verdict = _compare(manifest, seal.rel, data)
    if verdict == "":
        message = f"{seal.sig}: covers it but does not list {seal.rel} (added after sealing?)"
        out.append(finding("TG504", message, file=source))
    elif verdict:
        out.append(finding("TG503", f"{seal.sig}: {verdict}", file=source))
    if deciding and not policy.expect.empty:
        for f in freshness.check(policy.expect, manifest, digest, source):
            out.append(finding(f.rule, f"{seal.sig}: {f.message}", file=source))
    return out


def _ignored(manifest: Any, rel: str) -> bool:
    ser = manifest.serialization
    return IgnoreRules((*ser.ignore_paths, *GIT_PATHS), ser.ignore_patterns).matches(rel)


def _verified_manifest(policy: TrustPolicy, sig: Path) -> tuple[Any, str]:
    """The manifest a trusted signer signed in ``sig``, and the payload's SHA-256."""
    import hashlib
    import stat

    from trainguard.signing import bundle as bundles
    from trainguard.signing.manifest import ManifestError, parse_statement

    try:
        # Never open a FIFO or device planted as a signature (it could block forever).
        regular = stat.S_ISREG(os.stat(sig).st_mode)
        bundle = bundles.read_bundle(sig) if regular else None
    except (OSError, SealError) as exc:
        bundle, why = None, str(exc)
    else:
        why = "not a regular file"
    if bundle is None:
        raise VerificationError(why, [finding("TG502", f"unreadable signature: {why}")])
    failure: VerificationError | None = None
    for key in policy.keys:
        try:
            payload, _ = bundles.verify_bundle(bundle, key)
            break
        except VerificationError as exc:
            failure = failure or exc
    else:
        payload = _keyless(policy, bundle, failure)
    try:
        return parse_statement(payload), hashlib.sha256(payload).hexdigest()
    except ManifestError as exc:
        raise VerificationError(
            f"{sig}: unusable manifest", [finding("TG502", f"unusable manifest: {exc}")]
        ) from exc


def _keyless(policy: TrustPolicy, bundle: Any, failure: VerificationError | None) -> bytes:
    for who in policy.identities:
        from trainguard.signing.keyless import verify_bundle as verify_keyless

        try:
            return verify_keyless(bundle, who)[0]
        except VerificationError as exc:
            failure = failure or exc
    if failure is None:
        failure = VerificationError("no trusted signer", [finding("TG501", "no trusted signer")])
    raise VerificationError(
        "signed by no signer this policy trusts",
        [finding("TG501", f"signed by no key or identity the trust policy trusts ({failure})")],
    )


def _compare(manifest: Any, rel: str, data: bytes) -> str | None:
    """None when ``data`` is what the manifest lists for ``rel``, else the reason ("" unlisted)."""
    from trainguard.signing.hashing import digest_bytes

    ser = manifest.serialization
    entries = [r for r in manifest.resources if r.path == rel]
    if not entries:
        return ""
    if ser.method == "shards":
        spans = sorted((r.span or (0, 0), r.digest) for r in entries)
        if spans[-1][0][1] != len(data) or spans[0][0][0] != 0:
            return f"{rel} is {len(data)} bytes, the sealed shards cover another size"
        for (start, end), digest in spans:
            if digest_bytes(ser.hash_type, data[start:end]) != digest:
                return f"{rel} bytes {start}-{end} differ from what was sealed"
        return None
    digest = digest_bytes(ser.hash_type, data)
    if digest != entries[0].digest:
        return f"{rel} differs from what was sealed ({ser.hash_type} {digest.hex()[:16]}...)"
    return None
