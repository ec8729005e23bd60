"""Rollback: an older folder with its own valid seal from the same key is caught
when the verifier says which release it expects (name, minimum version, pinned digest)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from trainguard.cli.main import main
from trainguard.errors import UsageError
from trainguard.signing import seal, verify_report
from trainguard.signing.freshness import version_key
from trainguard.signing.keys import write_keypair


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


def release(root: Path, private: Path, version: str | None, name: str | None = "llama") -> str:
    root.mkdir(exist_ok=True)
    (root / "weights.bin").write_text(f"weights of {version}")
    return seal(root, private, name=name, version=version).manifest_digest


def rules(root: Path, public: Path, **expect: str) -> list[str]:
    return sorted(f.rule for f in verify_report(root, public, **expect).report.findings)  # type: ignore[arg-type]


def test_rollback_to_an_older_seal_of_the_same_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    old, current = tmp_path / "v1", tmp_path / "model"
    release(old, keys[0], "1.9")
    digest_now = release(current, keys[0], "1.10")
    assert rules(current, keys[1], expect_name="llama", min_version="1.10") == []
    assert rules(current, keys[1], expect_digest=digest_now) == []
    # The attacker puts the older release back, signature and all: still a valid seal.
    shutil.rmtree(current)
    shutil.copytree(old, current)
    assert rules(current, keys[1]) == []
    result = verify_report(current, keys[1], expect_name="llama", min_version="1.10")
    [finding] = result.report.findings
    assert finding.rule == "TG508" and "rollback" in finding.message
    assert finding.evidence["sealed_version"] == "1.9" and result.report.failed
    assert rules(current, keys[1], expect_digest=digest_now.upper()) == ["TG508"]
    assert rules(current, keys[1], expect_name="mistral") == ["TG509"]


def test_versions_compare_as_dotted_numbers() -> None:
    rng = random.Random()
    for _ in range(200):
        a = tuple(rng.randint(0, 12) for _ in range(rng.randint(1, 4)))
        b = tuple(rng.randint(0, 12) for _ in range(rng.randint(1, 4)))
        ka, kb = version_key(".".join(map(str, a))), version_key("v" + ".".join(map(str, b)))
        assert ka is not None and kb is not None

        def strip(t: tuple[int, ...]) -> tuple[int, ...]:
            while len(t) > 1 and t[-1] == 0:
                t = t[:-1]
            return t

        assert (ka < kb) == (strip(a) < strip(b)), (a, b)
    assert version_key("1.0") == version_key("1") and version_key("1.2-rc1") is None


def test_a_seal_without_version_or_with_an_odd_one_is_not_taken_as_fresh(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    release(tmp_path / "a", keys[0], None, name=None)
    assert rules(tmp_path / "a", keys[1], min_version="1") == ["TG508"]
    release(tmp_path / "b", keys[0], "2024-rc")
    assert any("not a dotted number" in n for n in seal(tmp_path / "b", keys[0], version="x").notes)
    assert rules(tmp_path / "b", keys[1], min_version="1") == ["TG508"]
    # No --name: the subject name model-signing records (the folder's) is compared.
    assert rules(tmp_path / "a", keys[1], expect_name="a") == []
    with pytest.raises(UsageError):
        verify_report(tmp_path / "a", keys[1], min_version="latest")
    with pytest.raises(UsageError):
        verify_report(tmp_path / "a", keys[1], expect_digest="abc")
    with pytest.raises(UsageError):
        seal(tmp_path / "a", keys[0], version="1\n2")


def test_cli_seal_name_version_and_verify_expectations(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "w.bin").write_bytes(b"w")
    argv = ["seal", str(root), "--key", str(keys[0]), "--name", "llama", "--version", "3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    digest = err.split("manifest sha256 ")[1].split()[0].rstrip(";")
    assert len(digest) == 64
    verify = ["verify", str(root), "--key", str(keys[1])]
    assert (
        main([*verify, "--expect-name", "llama", "--min-version", "3", "--expect-digest", digest])
        == 0
    )
    assert "hashing: " in capsys.readouterr().err
    assert main([*verify, "--min-version", "4"]) == 1
    assert "TG508" in capsys.readouterr().out
    assert main([*verify, "--expect-digest", "0" * 64]) == 1
    assert main([*verify, "--min-version", "four"]) == 2


def test_a_single_file_seal_binds_the_files_name(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    # Red team verify_rename_1: two files of one release, each sealed on its own
    # with the same name and version.  One's bytes and signature copied under the
    # other's name verify as the key's seal, but not of a file with that name.
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "policy.pt").write_bytes(b"the policy")
    (rel / "probe.pt").write_bytes(b"a probe")
    for name in ("policy.pt", "probe.pt"):
        seal(rel / name, keys[0], name="rlhf-run", version="7")
    expect = {"expect_name": "rlhf-run", "min_version": "7"}
    assert rules(rel / "policy.pt", keys[1], **expect) == []
    shutil.copyfile(rel / "probe.pt", rel / "policy.pt")
    shutil.copyfile(rel / "probe.pt.sig", rel / "policy.pt.sig")
    for given in ({}, expect):
        result = verify_report(rel / "policy.pt", keys[1], **given)  # type: ignore[arg-type]
        [finding] = result.report.findings
        assert finding.rule == "TG506" and result.report.failed
        assert finding.evidence == {"sealed_as": "probe.pt", "now_at": "policy.pt"}
    # The sealed file moved under a new name (bytes and signature together) fails too.
    (rel / "probe.pt").rename(rel / "renamed.pt")
    (rel / "probe.pt.sig").rename(rel / "renamed.pt.sig")
    assert rules(rel / "renamed.pt", keys[1]) == ["TG506"]
