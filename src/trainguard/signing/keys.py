"""Key pairs for signing: ECDSA P-256/P-384 and Ed25519, PEM on disk.

Keys are read with ``cryptography`` and handed around as its key objects.
Error messages name the file and the reason, never the key material, and
exceptions from the parser are not chained (their text could quote the file).
OpenSSF model signing accepts the ECDSA keys only (P-256, P-384, P-521);
Ed25519 signatures verify with trainguard alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from trainguard.signing.errors import KeyLoadError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    PublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519")
# Curves model-signing accepts; P-521 keys made elsewhere are accepted too.
_CURVES = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}
_MAX_KEY_FILE = 64 * 1024  # a PEM key or certificate is a few KiB at most


def generate_keypair(kind: str = "ecdsa-p256") -> tuple[bytes, bytes]:
    """A new key pair as (PKCS#8 private PEM, SubjectPublicKeyInfo public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    private: PrivateKey
    if kind == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ecdsa-p384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise KeyLoadError(f"unknown key type {kind!r} (expected one of: {', '.join(KEY_TYPES)})")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private_pem, public_pem(private.public_key())


def public_pem(key: PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: PublicKey) -> str:
    """The hex SHA-256 of the public key's PEM: model-signing's ``publicKey.hint``."""
    return hashlib.sha256(public_pem(key)).hexdigest()


def write_keypair(prefix: str | os.PathLike[str], kind: str = "ecdsa-p256") -> tuple[Path, Path]:
    """Write ``PREFIX.pem`` (mode 0600, created exclusively) and ``PREFIX.pub``."""
    private_pem, pub_pem = generate_keypair(kind)
    private_path = Path(f"{os.fspath(prefix)}.pem")
    public_path = Path(f"{os.fspath(prefix)}.pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyLoadError(f"{path}: already exists; not overwriting a key")
    _write_private(private_path, private_pem)
    public_path.write_bytes(pub_pem)
    return private_path, public_path


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> Path:
    """Write an existing private key as unencrypted PKCS#8 PEM (mode 0600, created exclusively)."""
    from cryptography.hazmat.primitives import serialization

    target = Path(path)
    if target.exists() or target.is_symlink():
        raise KeyLoadError(f"{target}: already exists; not overwriting a key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(target, pem)
    return target


def _write_private(path: Path, pem: bytes) -> None:
    # O_EXCL and the mode at creation: the private key is never readable by
    # others, not even between open() and chmod().
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyLoadError(f"{path}: already exists; not overwriting a key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyLoadError(f"{p}: cannot read key: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyLoadError(f"{p}: too large for a key file")
    return data


def _check_supported(key: object, path: str | os.PathLike[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise KeyLoadError(f"{path}: unsupported elliptic curve {key.curve.name}")
        return
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return
    kind = type(key).__name__.lstrip("_").replace("PrivateKey", "").replace("PublicKey", "")
    raise KeyLoadError(
        f"{path}: unsupported key type {kind or 'unknown'} (use ECDSA P-256/P-384 or Ed25519)"
    )


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> PrivateKey:
    """Read a PEM private key (PKCS#8 or traditional, optionally encrypted)."""
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path)
    if b"PRIVATE KEY" not in data:
        hint = " (this is a public key)" if b"PUBLIC KEY" in data else ""
        raise KeyLoadError(f"{path}: not a PEM private key{hint}")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        if password is None:
            raise KeyLoadError(
                f"{path}: the private key is encrypted; a password is needed"
            ) from None
        raise KeyLoadError(f"{path}: a password was given but the key is not encrypted") from None
    except ValueError:
        # Also what a wrong password gives; the parser's text is not echoed.
        raise KeyLoadError(f"{path}: cannot parse the private key (or wrong password)") from None
    except Exception:  # unsupported algorithms raise other types
        raise KeyLoadError(f"{path}: unsupported private key") from None
    _check_supported(key, path)
    return key  # type: ignore[return-value]  # narrowed by _check_supported


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Read a PEM public key, or the public key of a PEM X.509 certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise KeyLoadError(f"{path}: this is a private key; verification needs the public key")
    try:
        if b"BEGIN CERTIFICATE" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except Exception:
        raise KeyLoadError(f"{path}: not a PEM public key or certificate") from None
    _check_supported(key, path)
    return key  # type: ignore[return-value]


def private_key_from(key: object, password: bytes | None = None) -> PrivateKey:
    """A private key given as a key object or as the path of its PEM file.

    Every API that takes "a key or a path" (``seal``, ``watch(sign_key=)``,
    ``ledger.sign_head``, ...) goes through here, so that a path and an object
    are checked the same way: an unsupported key fails before anything is signed.
    """
    if isinstance(key, str | os.PathLike):
        return load_private_key(key, password)
    _check_object(key, private=True)
    return key  # type: ignore[return-value]  # narrowed by _check_object


def public_key_from(key: object) -> PublicKey:
    """A public key given as a key object or as the path of a PEM key or certificate."""
    if isinstance(key, str | os.PathLike):
        return load_public_key(key)
    _check_object(key, private=False)
    return key  # type: ignore[return-value]  # narrowed by _check_object


def _check_object(key: object, *, private: bool) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    privates = (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    publics = (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)
    wanted, other = (privates, publics) if private else (publics, privates)
    if isinstance(key, other):
        kind = "a public" if private else "a private"
        raise KeyLoadError(
            f"{kind} key was given where {'a private' if private else 'a public'} key is needed"
        )
    _check_supported(key, "the key object")
    if not isinstance(key, wanted):  # pragma: no cover - _check_supported refused it
        raise KeyLoadError("the key object: unsupported key type")
