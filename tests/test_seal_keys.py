"""Keys and DSSE envelopes: generation, loading errors, signing and tampering."""

from __future__ import annotations

import base64
import copy
import os
import stat
from pathlib import Path

import pytest

from trainguard.cli.main import main
from trainguard.errors import UsageError
from trainguard.signing import KeyLoadError, VerificationError
from trainguard.signing.dsse import pae, sign_envelope, verify_envelope
from trainguard.signing.keys import (
    KEY_TYPES,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    private_key_from,
    public_key_from,
    write_keypair,
)


@pytest.fixture(params=KEY_TYPES)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    private, public = write_keypair(tmp_path / "k", request.param)
    return private, public


def test_pae_is_dsse_v1() -> None:
    # The example from the DSSE v1 protocol: lengths in bytes, single spaces.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_round_trip_every_key_type(pair: tuple[Path, Path]) -> None:
    private, public = (load_private_key(pair[0]), load_public_key(pair[1]))
    envelope = sign_envelope(b'{"x": 1}', "application/vnd.in-toto+json", private)
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert base64.b64decode(envelope["payload"]) == b'{"x": 1}'
    assert envelope["signatures"][0]["keyid"] == key_id(public)
    assert verify_envelope(envelope, public) == b'{"x": 1}'


def test_tampered_payload_and_type_fail(pair: tuple[Path, Path]) -> None:
    private, public = (load_private_key(pair[0]), load_public_key(pair[1]))
    envelope = sign_envelope(b"payload", "text/plain", private)
    edited = copy.deepcopy(envelope)
    edited["payload"] = base64.b64encode(b"pAyload").decode()
    with pytest.raises(VerificationError) as err:
        verify_envelope(edited, public)
    assert [f.rule for f in err.value.findings] == ["TG501"]
    # The type is covered by the signature too (PAE), not only the payload.
    retyped = dict(envelope, payloadType="text/other")
    with pytest.raises(VerificationError):
        verify_envelope(retyped, public)
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, public, payload_type="application/vnd.in-toto+json")
    assert err.value.findings[0].rule == "TG502"


def test_wrong_key_fails(tmp_path: Path) -> None:
    signer = load_private_key(write_keypair(tmp_path / "a")[0])
    other = load_public_key(write_keypair(tmp_path / "b")[1])
    with pytest.raises(VerificationError) as err:
        verify_envelope(sign_envelope(b"p", "t", signer), other)
    assert err.value.findings[0].rule == "TG501"


@pytest.mark.parametrize(
    "envelope",
    [
        [],
        {"payloadType": "t"},
        {"payloadType": "t", "payload": "not base64!", "signatures": [{"sig": "AA=="}]},
        {"payloadType": "t", "payload": "cA==", "signatures": []},
        {"payloadType": "t", "payload": "cA==", "signatures": ["x"]},
        {"payloadType": "t", "payload": "cA==", "signatures": [{"sig": 5}]},
    ],
)
def test_malformed_envelopes_are_tg502(envelope: object, tmp_path: Path) -> None:
    public = load_public_key(write_keypair(tmp_path / "k")[1])
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, public)  # type: ignore[arg-type]
    assert err.value.findings[0].rule == "TG502"


def test_keygen_writes_private_0600_and_never_overwrites(tmp_path: Path) -> None:
    private, public = write_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(KeyLoadError, match="already exists"):
        write_keypair(tmp_path / "k")


def test_cli_keygen_prints_no_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--type", "ed25519", "-o", str(tmp_path / "id")]) == 0
    out, err = capsys.readouterr()
    body = (tmp_path / "id.pem").read_text().splitlines()[1]
    assert body not in out + err and "PRIVATE KEY" not in out + err
    assert main(["keygen", "-o", str(tmp_path / "id")]) == 2  # exists: refused


def test_load_errors_are_clear_and_leak_nothing(tmp_path: Path) -> None:
    private_pem, public_pem = generate_keypair()
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    priv.write_bytes(private_pem)
    pub.write_bytes(public_pem)
    with pytest.raises(KeyLoadError, match="this is a public key"):
        load_private_key(pub)
    with pytest.raises(KeyLoadError, match="private key; verification needs the public"):
        load_public_key(priv)
    garbage = tmp_path / "g.pem"
    secret_line = private_pem.splitlines()[1].decode()
    garbage.write_text(
        f"-----BEGIN PRIVATE KEY-----\n{secret_line[:-4]}\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(KeyLoadError) as err:
        load_private_key(garbage)
    assert secret_line[:20] not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(KeyLoadError, match="cannot read key"):
        load_private_key(tmp_path / "missing.pem")
    assert isinstance(KeyLoadError("x"), UsageError)  # the CLI exits 2 on it


def test_encrypted_key_needs_its_password(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "enc.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    with pytest.raises(KeyLoadError, match="encrypted"):
        load_private_key(path)
    with pytest.raises(KeyLoadError, match="wrong password"):
        load_private_key(path, b"nope")
    assert load_private_key(path, b"s3cret").public_key() == key.public_key()


def test_unsupported_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k1 = ec.generate_private_key(ec.SECP256K1())
    for name, key in (("rsa.pem", rsa_key), ("k1.pem", k1)):
        path = tmp_path / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(KeyLoadError, match="unsupported"):
            load_private_key(path)


def test_a_key_is_an_object_or_a_path_the_same_way_everywhere(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """``private_key_from``/``public_key_from`` are the one "key object or PEM path"
    helper (seal, verify, the ledger, protect, watch): both forms give the same key,
    and a wrong key fails there, before anything is signed or trusted."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private = private_key_from(pair[0])
    assert private_key_from(str(pair[0])).public_key() == private.public_key()
    assert private_key_from(private) is private
    public = public_key_from(pair[1])
    assert public_key_from(public) is public and public == private.public_key()
    with pytest.raises(KeyLoadError, match="public key was given"):
        private_key_from(public)
    with pytest.raises(KeyLoadError, match="private key was given"):
        public_key_from(private)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (rsa_key, ec.generate_private_key(ec.SECP256K1()), b"pem"):
        with pytest.raises(KeyLoadError, match="unsupported"):
            private_key_from(bad)
