"""Sigstore bundles (v0.3 JSON) around a DSSE envelope, as model-signing writes them.

For key signing, model-signing writes::

    {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
     "verificationMaterial": {"publicKey": {"hint": SHA256(PUBLIC PEM)},
                              "tlogEntries": []},
     "dsseEnvelope": {"payload": B64, "payloadType": "application/vnd.in-toto+json",
                      "signatures": [{"sig": B64, "keyid": ""}]}}

and for certificate signing, ``x509CertificateChain.certificates[].rawBytes``
(base64 DER, signing certificate first) instead of ``publicKey``.  Nothing in
``verificationMaterial`` is signed: the hint only helps to say "another key";
a certificate's key must equal the key the verifier was given.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.findings import Finding
from trainguard.rules import rule
from trainguard.signing.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    MAX_PAYLOAD,
    sign_envelope,
    verify_envelope,
)
from trainguard.signing.errors import SealError, VerificationError
from trainguard.signing.keys import key_id

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey, PublicKey

MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_ACCEPTED_MEDIA_TYPES = (
    MEDIA_TYPE,
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
)
# The payload is base64 inside JSON: a bundle is at most ~4/3 of it plus a little.
MAX_BUNDLE = MAX_PAYLOAD * 4 // 3 + 1024 * 1024
MAX_CERTIFICATES = 10
# A certificate is a few KiB; base64 of 64 KiB leaves room for long chains' leaves.
MAX_CERTIFICATE_B64 = 64 * 1024


def build_bundle(payload: bytes, private_key: PrivateKey) -> dict[str, Any]:
    envelope = sign_envelope(payload, IN_TOTO_PAYLOAD_TYPE, private_key)
    # model-signing leaves keyid empty and finds the key through the hint.
    for signature in envelope["signatures"]:
        signature["keyid"] = ""
    return {
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_id(private_key.public_key())},
            "tlogEntries": [],
        },
        "dsseEnvelope": envelope,
    }


def write_bundle(path: str | os.PathLike[str], bundle: dict[str, Any]) -> None:
    """Write atomically: a crash never leaves half a signature behind."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(bundle, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SealError(f"{target}: cannot write the signature: {exc.strerror}") from None


def _malformed(reason: str) -> VerificationError:
    finding = Finding(
        rule="TG502",
        severity=rule("TG502").severity,
        message=f"the signature is not a usable Sigstore bundle: {reason}",
    )
    return VerificationError(finding.message, [finding])


def read_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's JSON; :class:`VerificationError` (TG502) if it is not one."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BUNDLE + 1)
    except FileNotFoundError:
        raise SealError(f"{path}: no such signature file") from None
    except OSError as exc:
        raise SealError(f"{path}: cannot read the signature: {exc.strerror}") from None
    if len(data) > MAX_BUNDLE:
        raise _malformed(f"larger than {MAX_BUNDLE} bytes")
    try:
        bundle = json.loads(data)
    except (ValueError, RecursionError):
        raise _malformed("not JSON (truncated or corrupted?)") from None
    if not isinstance(bundle, dict):
        raise _malformed("not a JSON object")
    if bundle.get("mediaType") not in _ACCEPTED_MEDIA_TYPES:
        raise _malformed(f"unexpected mediaType {str(bundle.get('mediaType'))[:80]!r}")
    if not isinstance(bundle.get("dsseEnvelope"), dict):
        raise _malformed("it carries no DSSE envelope (a message signature?)")
    return bundle


@dataclass(frozen=True)
class SignerInfo:
    key_id: str  # hex SHA-256 of the verifying public key's PEM
    certificate_subject: str | None = None


def _leaf_certificate_key(material: dict[str, Any]) -> tuple[PublicKey, str] | None:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    chain = material.get("x509CertificateChain")
    certs = chain.get("certificates") if isinstance(chain, dict) else None
    if certs is None and isinstance(material.get("certificate"), dict):
        certs = [material["certificate"]]
    if certs is None:
        return None
    if not isinstance(certs, list) or not certs or len(certs) > MAX_CERTIFICATES:
        raise _malformed("bad certificate chain")
    leaf = certs[0].get("rawBytes") if isinstance(certs[0], dict) else None
    if not isinstance(leaf, str) or len(leaf) > MAX_CERTIFICATE_B64:
        raise _malformed("the signing certificate is missing or too large")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(leaf, validate=True))
    except (binascii.Error, ValueError):
        raise _malformed("the signing certificate cannot be parsed") from None
    try:
        # Parsed lazily: an unknown key algorithm (a DSA, Ed448 or unknown-OID key)
        # or a malformed name only fails here, with cryptography's own exception types.
        key = cert.public_key()
        subject = cert.subject.rfc4514_string()
    except (UnsupportedAlgorithm, ValueError, TypeError):
        raise _malformed("the signing certificate's key type is not supported") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise _malformed("the signing certificate's key type is not supported")
    return key, subject


def verify_bundle(bundle: dict[str, Any], public_key: PublicKey) -> tuple[bytes, SignerInfo]:
    """The signed payload, once the envelope verifies with ``public_key``.

    A bundle signed through a certificate verifies when the certificate holds
    ``public_key`` (key pinning: the chain itself is not validated here).
    """
    material = bundle.get("verificationMaterial")
    if not isinstance(material, dict):
        raise _malformed("verificationMaterial is missing")
    ours = key_id(public_key)
    subject = None
    leaf = _leaf_certificate_key(material)
    if leaf is not None:
        cert_key, subject = leaf
        if key_id(cert_key) != ours:
            raise _wrong_key(ours, key_id(cert_key), f"the certificate of {subject}")
    try:
        payload = verify_envelope(bundle["dsseEnvelope"], public_key, IN_TOTO_PAYLOAD_TYPE)
    except VerificationError as exc:
        hint = material.get("publicKey", {})
        hinted = hint.get("hint") if isinstance(hint, dict) else None
        if exc.findings[0].rule == "TG501" and isinstance(hinted, str) and hinted != ours:
            raise _wrong_key(ours, hinted, "a key") from None
        raise
    return payload, SignerInfo(ours, subject)


def _wrong_key(ours: str, theirs: str, signer: str) -> VerificationError:
    finding = Finding(
        rule="TG501",
        severity=rule("TG501").severity,
        message=f"signed with another key: {signer} with id {theirs[:16]}..., "
        f"not the given key {ours[:16]}...",
        evidence={"signer_key_id": theirs[:64], "given_key_id": ours},
    )
    return VerificationError(finding.message, [finding])
