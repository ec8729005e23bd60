"""Seal: signed manifests of model folders, and verification.

Signatures are Sigstore bundles carrying a DSSE-signed in-toto statement in the
OpenSSF model-signing v1 format, so ``model_signing verify key`` accepts what
trainguard seals and ``trainguard verify`` accepts what model-signing signs.
Importing this package is cheap: ``cryptography`` and ``blake3`` load on use.

Import submodules with ``from trainguard.seal.keys import ...``: the package
``trainguard`` binds the name ``seal`` to the function, as it does for ``scan``.
"""

from __future__ import annotations

from trainguard.seal.api import (
    SealResult,
    VerifyResult,
    default_signature,
    seal,
    verify,
    verify_report,
)
from trainguard.seal.digest_cache import DigestCache
from trainguard.seal.errors import KeyLoadError, SealError, VerificationError
from trainguard.seal.keyless import KeylessSigning, SigstoreIdentity

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
