"""DSSE envelopes (https://github.com/secure-systems-lab/dsse, protocol v1).

The signature covers the pre-authentication encoding (PAE) of the payload type
and payload, never the JSON around it, so nothing outside ``payload`` can be
edited without breaking it.  ECDSA signatures are DER-encoded with the hash
that matches the curve (SHA-256 for P-256, SHA-384 for P-384, SHA-512 for
P-521), as model-signing and Sigstore expect; Ed25519 signs the PAE directly.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from trainguard.findings import Finding
from trainguard.rules import rule
from trainguard.signing.errors import VerificationError
from trainguard.signing.keys import key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes

    from trainguard.signing.keys import PrivateKey, PublicKey

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
# A manifest costs ~150 bytes a file: 64 MiB is some 400,000 files or shards.
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_SIGNATURES = 16


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding; lengths are in bytes."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _ec_hash(bits: int) -> hashes.HashAlgorithm:
    from cryptography.hazmat.primitives import hashes

    if bits <= 256:
        return hashes.SHA256()
    if bits <= 384:
        return hashes.SHA384()
    return hashes.SHA512()


def sign_bytes(message: bytes, private_key: PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(message, ec.ECDSA(_ec_hash(private_key.curve.key_size)))
    return private_key.sign(message)


def _verify_bytes(signature: bytes, message: bytes, public_key: PublicKey) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(_ec_hash(public_key.curve.key_size)))
        else:
            public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def sign_envelope(payload: bytes, payload_type: str, private_key: PrivateKey) -> dict[str, Any]:
    """A DSSE envelope signed by ``private_key``; ``keyid`` is :func:`key_id`."""
    signature = sign_bytes(pae(payload_type, payload), private_key)
    return {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": [
            {
                "sig": base64.b64encode(signature).decode("ascii"),
                "keyid": key_id(private_key.public_key()),
            }
        ],
    }


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise _malformed(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not valid base64") from None


def _malformed(reason: str) -> VerificationError:
    finding = Finding(
        rule="TG502",
        severity=rule("TG502").severity,
        message=f"the DSSE envelope is malformed: {reason}",
    )
    return VerificationError(finding.message, [finding])


def verify_envelope(
    envelope: dict[str, Any], public_key: PublicKey, payload_type: str | None = None
) -> bytes:
    """The payload, once one signature in ``envelope`` verifies with ``public_key``.

    ``keyid`` is only a hint (model-signing leaves it empty), so every
    signature is tried.  Raises :class:`VerificationError` (TG502 when the
    envelope cannot be read, TG501 when no signature verifies) otherwise.
    When ``payload_type`` is given, the envelope must carry that type.
    """
    if not isinstance(envelope, dict):
        raise _malformed("not a JSON object")
    kind = envelope.get("payloadType")
    if not isinstance(kind, str):
        raise _malformed("payloadType is missing")
    if payload_type is not None and kind != payload_type:
        raise _malformed(f"payloadType is {kind!r}, expected {payload_type!r}")
    raw = envelope.get("payload")
    if isinstance(raw, str) and len(raw) > MAX_PAYLOAD * 4 // 3 + 4:
        raise _malformed(f"payload is larger than {MAX_PAYLOAD} bytes")
    payload = _b64(raw, "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise _malformed("it carries no signature")
    if len(signatures) > MAX_SIGNATURES:
        raise _malformed(f"more than {MAX_SIGNATURES} signatures")
    message = pae(kind, payload)
    for entry in signatures:
        if not isinstance(entry, dict):
            raise _malformed("a signature entry is not an object")
        if _verify_bytes(_b64(entry.get("sig"), "signature"), message, public_key):
            return payload
    finding = Finding(
        rule="TG501",
        severity=rule("TG501").severity,
        message="no signature verifies with the given public key (another key signed it, "
        "or the signed content was edited)",
        evidence={"public_key_id": key_id(public_key)},
    )
    raise VerificationError(finding.message, [finding])
