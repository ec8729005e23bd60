"""Keyless Sigstore signatures, verified offline with a real model-signing bundle.

The fixture (tests/data/sigstore-keyless-model, see its README) was signed by
OpenSSF model-signing against Sigstore's production Fulcio and Rekor; it is
checked here against the trusted root that ships with ``sigstore``, so the
tests need no network.  Keyless *signing* needs Fulcio and an OIDC token, so
only its refusals are tested.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.errors import UsageError
from trainguard.findings import Severity
from trainguard.signing import SigstoreIdentity, seal, verify_report
from trainguard.signing.keys import write_keypair

pytest.importorskip("sigstore")

FIXTURE = Path(__file__).parent / "data" / "sigstore-keyless-model" / "model"
IDENTITY = "stefanb@us.ibm.com"
ISSUER = "https://sigstore.verify.ibm.com/oauth2"
SIGNER = SigstoreIdentity(IDENTITY, ISSUER, offline=True)


@pytest.fixture(autouse=True)
def private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # sigstore's TUF cache and our digest cache both live under XDG dirs.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "model"))


def _rules(result: object) -> set[str]:
    return {f.rule for f in result.report.findings}  # type: ignore[attr-defined]


def test_real_keyless_signature_verifies_offline(model: Path) -> None:
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert result.report.findings == []
    assert result.manifest is not None
    assert result.files_checked == 2
    assert result.signer_identity == f"{IDENTITY} ({ISSUER})"


@pytest.mark.parametrize(
    "who",
    [
        SigstoreIdentity("mallory@example.com", ISSUER, offline=True),
        SigstoreIdentity(IDENTITY, "https://accounts.google.com", offline=True),
    ],
    ids=["other-identity", "other-issuer"],
)
def test_another_identity_or_issuer_fails(model: Path, who: SigstoreIdentity) -> None:
    result = verify_report(model, who, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG501"}
    assert result.report.failed and result.manifest is None
    message = result.report.findings[0].message
    assert who.identity in message


def test_a_modified_file_is_reported_with_both_digests(model: Path) -> None:
    (model / "signme-1").write_bytes(b"tampered")
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG503"}
    (bad,) = result.report.findings
    assert bad.file.endswith("signme-1") and bad.severity == Severity.CRITICAL


def test_an_added_file_is_reported(model: Path) -> None:
    (model / "extra.bin").write_bytes(b"planted")
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG504"}


def test_an_edited_manifest_breaks_the_signature(model: Path) -> None:
    sig = model / "model.sig"
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG501"} and result.manifest is None


def test_a_truncated_bundle_is_malformed(model: Path) -> None:
    sig = model / "model.sig"
    sig.write_bytes(sig.read_bytes()[:2000])
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG502"}


def test_a_key_signature_is_not_accepted_as_keyless(tmp_path: Path, model: Path) -> None:
    private, _ = write_keypair(tmp_path / "key")
    seal(model, private, ignore=["ignore-me"], cache=False)
    result = verify_report(model, SIGNER, ignore=["ignore-me"], cache=False)
    assert _rules(result) == {"TG501"}
    assert "made with a key" in result.report.findings[0].message


def test_identity_needs_both_parts() -> None:
    with pytest.raises(UsageError):
        SigstoreIdentity(IDENTITY, " ")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_verifies_keyless_and_names_the_signer(model: Path) -> None:
    proc = _cli(
        "verify", str(model), "--identity", IDENTITY, "--issuer", ISSUER, "--offline",
        "--ignore", "ignore-me", "--no-cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"verified 2 files against {model / 'model.sig'} ({IDENTITY} ({ISSUER})" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--key", "k.pub", "--identity", IDENTITY, "--issuer", ISSUER],
        ["--identity", IDENTITY],
        [],
        ["--key", "k.pub", "--offline"],
    ],
    ids=["key-and-identity", "no-issuer", "nothing", "offline-with-key"],
)
def test_cli_refuses_unclear_verification_requests(model: Path, args: list[str]) -> None:
    proc = _cli("verify", str(model), *args)
    assert proc.returncode == 2
    assert "error" in proc.stderr


def test_keyless_seal_without_a_token_is_a_clear_usage_error(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if "TOKEN" not in k and not k.startswith("CI")}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"w")
    proc = _cli("seal", str(tmp_path / "m"), "--keyless", env=env)
    assert proc.returncode == 2
    assert "needs an OIDC identity token" in proc.stderr
    assert not (tmp_path / "m" / "model.sig").exists()


def test_without_sigstore_keyless_is_a_missing_extra(model: Path) -> None:
    probe = (
        "import sys; sys.modules['sigstore'] = None\n"
        "from trainguard.cli.main import main\n"
        f"sys.exit(main(['verify', {str(model)!r}, '--identity', 'a@b', '--issuer', 'https://x']))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "trainguard[keyless]" in proc.stderr
