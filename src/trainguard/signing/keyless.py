"""Keyless Sigstore signatures: an identity (an email, a CI workflow) instead of a key.

The bundle then carries a short-lived Fulcio certificate for that identity and
a Rekor transparency-log entry with its inclusion proof, as OpenSSF
model-signing writes with ``model_signing sign sigstore``.  Verification
checks the certificate chain against Sigstore's trusted root, the log entry,
and that the certificate names the expected identity and OIDC issuer; then the
manifest is compared with the folder exactly as for a key signature.

Needs the optional extra ``trainguard[keyless]`` (the ``sigstore`` package).
Verification works offline with ``offline=True``: the trusted root shipped with
sigstore (or its cached TUF copy) is used and nothing is fetched; the bundle
holds the log's inclusion proof.  Signing always needs the network (Fulcio,
Rekor) and an OIDC identity token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from trainguard.errors import MissingExtraError, UsageError
from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.signing.bundle import SignerInfo
from trainguard.signing.dsse import IN_TOTO_PAYLOAD_TYPE
from trainguard.signing.errors import SealError, VerificationError

TOKEN_ENV = "SIGSTORE_ID_TOKEN"  # noqa: S105 - the variable's name, not a secret


@dataclass(frozen=True)
class SigstoreIdentity:
    """Who must have signed: the certificate's identity and the OIDC issuer that vouched for it.

    ``identity`` is an email address or a workload URI (for GitHub Actions,
    ``https://github.com/ORG/REPO/.github/workflows/FILE@refs/heads/main``);
    ``issuer`` e.g. ``https://accounts.google.com`` or
    ``https://token.actions.githubusercontent.com``.
    """

    identity: str
    issuer: str
    offline: bool = False
    staging: bool = False

    def __post_init__(self) -> None:
        if not self.identity.strip() or not self.issuer.strip():
            raise UsageError("keyless verification needs both an identity and an issuer")


@dataclass(frozen=True)
class KeylessSigning:
    """As ``key`` of :func:`trainguard.signing.seal`: sign keylessly (see :func:`sign_keyless`)."""

    identity_token: str | None = None
    staging: bool = False


def _sigstore() -> Any:
    try:
        import sigstore.models
        import sigstore.oidc
        import sigstore.sign
        import sigstore.verify
    except ImportError:
        raise MissingExtraError("sigstore", "keyless", "a keyless Sigstore signature") from None
    return sigstore


def _invalid(message: str, **evidence: str) -> VerificationError:
    bad: Finding = finding("TG501", message, evidence=evidence)
    return VerificationError(message, [bad])


def verify_bundle(bundle: dict[str, Any], who: SigstoreIdentity) -> tuple[bytes, SignerInfo]:
    """The signed in-toto payload, once the bundle verifies for ``who``.

    ``bundle`` has been read and bounded by :func:`trainguard.signing.bundle.read_bundle`.
    """
    sigstore = _sigstore()
    from sigstore.errors import Error as SigstoreError
    from sigstore.verify import policy

    material = bundle.get("verificationMaterial")
    if not isinstance(material, dict) or not (
        isinstance(material.get("certificate"), dict)
        or isinstance(material.get("x509CertificateChain"), dict)
    ):
        raise _invalid(
            "the signature was made with a key, not keyless Sigstore: verify it with --key"
        )
    try:
        parsed = sigstore.models.Bundle.from_json(json.dumps(bundle))
    except (SigstoreError, ValueError, KeyError, TypeError) as exc:
        raise _invalid(f"not a usable Sigstore bundle: {exc}") from None
    try:
        if who.staging:
            verifier = sigstore.verify.Verifier.staging(offline=who.offline)
        else:
            verifier = sigstore.verify.Verifier.production(offline=who.offline)
    except (SigstoreError, OSError) as exc:
        raise SealError(
            f"cannot load Sigstore's trusted root ({exc}); "
            "use --offline to use the copy shipped with sigstore"
        ) from None
    wanted = policy.Identity(identity=who.identity, issuer=who.issuer)
    try:
        payload_type, payload = verifier.verify_dsse(parsed, wanted)
    except SigstoreError as exc:
        raise _invalid(
            f"keyless signature does not verify for {who.identity} ({who.issuer}): {exc}",
            expected_identity=who.identity,
            expected_issuer=who.issuer,
        ) from None
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise _invalid(f"unexpected payload type {payload_type[:80]!r}")
    cert = parsed.signing_certificate
    from trainguard.signing.keys import key_id

    return payload, SignerInfo(key_id(cert.public_key()), f"{who.identity} ({who.issuer})")


def sign_keyless(
    payload: bytes, *, identity_token: str | None = None, staging: bool = False
) -> dict[str, Any]:
    """A keyless Sigstore bundle over ``payload`` (an in-toto statement); needs the network.

    The token comes from ``identity_token``, else ``$SIGSTORE_ID_TOKEN``, else the
    ambient credentials of a CI system that sigstore detects (GitHub Actions,
    GitLab, Buildkite, Google Cloud).  No browser flow: a training job has no
    person at it.
    """
    sigstore = _sigstore()
    from sigstore.dsse import Statement
    from sigstore.errors import Error as SigstoreError

    try:
        raw = identity_token or os.environ.get(TOKEN_ENV) or sigstore.oidc.detect_credential()
    except SigstoreError as exc:
        raise SealError(f"could not get an ambient OIDC identity token: {exc}") from None
    if not raw:
        raise UsageError(
            f"keyless signing needs an OIDC identity token: pass --identity-token, set "
            f"${TOKEN_ENV}, or run where sigstore detects ambient credentials (CI)"
        )
    try:
        token = sigstore.oidc.IdentityToken(raw)
        trust = (
            sigstore.models.ClientTrustConfig.staging()
            if staging
            else sigstore.models.ClientTrustConfig.production()
        )
        context = sigstore.sign.SigningContext.from_trust_config(trust)
        with context.signer(token, cache=False) as signer:
            signed = signer.sign_dsse(Statement(payload))
    except SigstoreError as exc:
        raise SealError(f"keyless signing failed: {exc}") from None
    document: dict[str, Any] = json.loads(signed.to_json())
    return document
