"""The seal/verify/keygen command line: options, passwords, progress, sizes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from trainguard.cli.main import main
from trainguard.cli.seal import PASSWORD_ENV, parse_size
from trainguard.signing import seal


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (root / "notes.tmp").write_text("scratch")
    return root


def test_parse_size() -> None:
    assert parse_size("1000000") == 1_000_000
    assert parse_size("64M") == 64 << 20
    assert parse_size("1GiB") == 1 << 30
    for bad in ("", "0", "1.5G", "-3", "12X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_seal_options_end_to_end(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "k"
    assert main(["keygen", "--type", "ecdsa-p384", "-o", str(prefix)]) == 0
    sig = tmp_path / "out" / "m.sig"
    sig.parent.mkdir()
    args = [
        "seal",
        str(model),
        "--key",
        f"{prefix}.pem",
        "--signature",
        str(sig),
        "--shard-size",
        "1M",
        "--ignore",
        "*.tmp",
        "--workers",
        "1",
        "--no-cache",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sealed 1 file" in err and "sha256-sharded-1048576" in err
    verify = ["verify", str(model), "--key", f"{prefix}.pub", "--signature", str(sig)]
    assert main(verify) == 0
    (model / "other.tmp").write_text("ignored by the signed pattern")
    assert main(verify) == 0
    (model / "weights.bin").write_bytes(b"x")
    assert main(verify) == 1
    assert main([*verify, "--ignore", "weights.bin"]) == 0  # the verifier's choice
    assert main(["seal", str(model), "--key", f"{prefix}.pem", "--workers", "0"]) == 2


def test_encrypted_key_password_from_environment(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "enc.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    pub = tmp_path / "enc.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert main(["seal", str(model), "--key", str(pem)]) == 2  # no password, no terminal
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert main(["seal", str(model), "--key", str(pem)]) == 2
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    assert main(["seal", str(model), "--key", str(pem)]) == 0
    assert main(["verify", str(model), "--key", str(pub)]) == 0


def test_progress_callback_reaches_the_total(model: Path, tmp_path: Path) -> None:
    from trainguard.signing.keys import write_keypair

    private, _ = write_keypair(tmp_path / "k")
    seen: list[tuple[int, int]] = []
    seal(
        model,
        private,
        cache=False,
        workers=2,
        shard_size=1 << 20,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = sum(p.stat().st_size for p in model.iterdir() if p.suffix != ".sig")
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_verify_fail_on_sets_the_verdict(model: Path, tmp_path: Path) -> None:
    """An added file is high (TG504), an edited one critical (TG503): --fail-on picks."""
    prefix = tmp_path / "k"
    assert main(["keygen", "-o", str(prefix)]) == 0
    assert main(["seal", str(model), "--key", f"{prefix}.pem", "--no-progress"]) == 0
    verify = ["verify", str(model), "--key", f"{prefix}.pub", "--no-progress", "-f", "json"]
    assert main([*verify, "--strict"]) == 0
    (model / "extra.bin").write_bytes(b"planted")
    assert main(verify) == 1
    assert main([*verify, "--strict"]) == 1
    assert main([*verify, "--fail-on", "critical"]) == 0
    (model / "weights.bin").write_bytes(b"edited")
    assert main([*verify, "--fail-on", "critical"]) == 1
