"""Seal: signed manifests of model folders, and verification.

Signatures are Sigstore bundles carrying a DSSE-signed in-toto statement in the
OpenSSF model-signing v1 format, so ``model_signing verify key`` accepts what
trainguard seals and ``trainguard verify`` accepts what model-signing signs.
Importing this package is cheap: ``cryptography`` and ``blake3`` load on use.

Import submodules with ``from trainguard.signing.keys import ...``: the package
``trainguard`` binds the name ``seal`` to the function, as it does for ``scan``.
"""

from __future__ import annotations

from trainguard.digest_cache import DigestCache
from trainguard.signing.api import (
    SealResult,
    VerifyResult,
    default_signature,
    seal,
    verify,
    verify_report,
)
from trainguard.signing.errors import KeyLoadError, SealError, VerificationError
from trainguard.signing.keyless import KeylessSigning, SigstoreIdentity

__all__ = [
    "DigestCache",
    "KeyLoadError",
    "KeylessSigning",
    "SealError",
    "SealResult",
    "SigstoreIdentity",
    "VerificationError",
    "VerifyResult",
    "default_signature",
    "seal",
    "verify",
    "verify_report",
]
