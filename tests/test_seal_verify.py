"""Seal and verify model folders: each kind of tampering gives its own finding."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from trainguard.cli.main import main
from trainguard.findings import Finding
from trainguard.signing import SealError, VerificationError, seal, verify, verify_report
from trainguard.signing.bundle import build_bundle, write_bundle
from trainguard.signing.keys import load_private_key, write_keypair

SHARD = 64 * 1024


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "shards").mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 2}')
    (root / "tokenizer.txt").write_text("a b c")
    # Large enough for several shards; the content of each shard differs.
    (root / "shards" / "weights.bin").write_bytes(os.urandom(5 * SHARD + 123))
    (root / "shards" / "empty.bin").write_bytes(b"")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def rules_by_file(findings: list[Finding]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in findings:
        out.setdefault(Path(f.file).name, []).append(f.rule)
    return out


def failing(model: Path, public: Path, **kw: object) -> list[Finding]:
    with pytest.raises(VerificationError) as err:
        verify(model, public, **kw)  # type: ignore[arg-type]
    return err.value.findings


@pytest.mark.parametrize("shard_size", [None, SHARD])
def test_clean_folder_verifies(
    model: Path, keys: tuple[Path, Path], shard_size: int | None
) -> None:
    result = seal(model, keys[0], shard_size=shard_size)
    assert result.signature == model / "model.sig"
    names = {r.path for r in result.manifest.resources}
    # .git and the signature are left out; an empty file has no shard to list,
    # so trainguard records it beside the resources.
    expected = {"config.json", "tokenizer.txt", "shards/weights.bin", "shards/empty.bin"}
    if shard_size:
        assert names == expected - {"shards/empty.bin"}
        assert result.manifest.empty_files == ("shards/empty.bin",)
    else:
        assert names == expected
    ok = verify(model, keys[1])
    assert ok.files_checked == 4 and not ok.report.failed
    assert not ok.report.findings


def test_flipped_byte_in_one_shard(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0], shard_size=SHARD)
    weights = model / "shards" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[3 * SHARD + 7] ^= 0x01
    weights.write_bytes(bytes(data))
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG503" and finding.file.endswith("shards/weights.bin")
    assert finding.evidence["first_differing_shard"] == f"{3 * SHARD}:{4 * SHARD}"
    assert finding.evidence["differing_shards"] == "1 of 6"
    assert len(finding.evidence["expected_digest"]) == 64
    assert finding.evidence["expected_digest"] != finding.evidence["actual_digest"]


def test_modified_file_shows_both_digests_and_sizes(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0])
    (model / "config.json").write_text('{"layers": 20}')
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG503"
    assert finding.evidence["expected_size"] == "13" and finding.evidence["actual_size"] == "14"
    int(finding.evidence["expected_digest"], 16)
    int(finding.evidence["actual_digest"], 16)


def test_added_removed_renamed_swapped(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0])
    (model / "extra.py").write_text("import os")
    (model / "tokenizer.txt").rename(model / "vocab.txt")
    (model / "config.json").rename(model / "tmp")
    (model / "shards" / "weights.bin").rename(model / "config.json")
    (model / "tmp").rename(model / "shards" / "weights.bin")
    (model / "shards" / "empty.bin").unlink()
    found = rules_by_file(failing(model, keys[1]))
    assert found == {
        "extra.py": ["TG504"],
        "vocab.txt": ["TG506"],
        "config.json": ["TG506"],
        "weights.bin": ["TG506"],
        "empty.bin": ["TG505"],
    }


def test_symlink_to_outside_is_refused_and_reported(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (model / "link.bin").symlink_to(outside)
    with pytest.raises(SealError, match=r"link\.bin: a symbolic link"):
        seal(model, keys[0])
    (model / "link.bin").unlink()
    seal(model, keys[0])
    (model / "shards" / "escape").symlink_to(tmp_path)
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG507" and finding.file.endswith("shards/escape")


def test_fifo_is_reported(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0])
    os.mkfifo(model / "pipe")
    assert rules_by_file(failing(model, keys[1])) == {"pipe": ["TG507"]}


def test_truncated_signature(model: Path, keys: tuple[Path, Path]) -> None:
    sig = seal(model, keys[0]).signature
    sig.write_bytes(sig.read_bytes()[:200])
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG502" and "not JSON" in finding.message


def test_signature_made_with_another_key(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other_private, _ = write_keypair(tmp_path / "other", "ecdsa-p384")
    seal(model, other_private)
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG501" and "another key" in finding.message


def _edit_payload(sig: Path, edit: object) -> None:
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    edit(statement)  # type: ignore[operator]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))


def test_manifest_edited_after_signing(model: Path, keys: tuple[Path, Path]) -> None:
    sig = seal(model, keys[0]).signature
    (model / "config.json").write_text("{}")

    def launder(statement: dict) -> None:  # type: ignore[type-arg]
        # Make the manifest agree with the tampered file: the signature must not.
        import hashlib

        for r in statement["predicate"]["resources"]:
            if r["name"] == "config.json":
                r["digest"] = hashlib.sha256(b"{}").hexdigest()
                r["size"] = 2

    _edit_payload(sig, launder)
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG501"


def _sign_statement(model: Path, private: Path, statement: dict) -> None:  # type: ignore[type-arg]
    payload = json.dumps(statement).encode()
    write_bundle(model / "model.sig", build_bundle(payload, load_private_key(private)))


def test_signed_but_inconsistent_manifest_is_tg502(model: Path, keys: tuple[Path, Path]) -> None:
    sig = seal(model, keys[0]).signature
    statement = json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "00" * 32
    _sign_statement(model, keys[0], statement)
    (finding,) = failing(model, keys[1])
    assert finding.rule == "TG502" and "subject digest" in finding.message


def test_signed_manifest_naming_a_path_outside(model: Path, keys: tuple[Path, Path]) -> None:
    result = seal(model, keys[0])
    statement = result.manifest.statement()
    statement["predicate"]["resources"].append(
        {"name": "../../etc/passwd", "algorithm": "sha256", "digest": "ab" * 32}
    )
    import hashlib

    root = hashlib.sha256(
        b"".join(bytes.fromhex(r["digest"]) for r in statement["predicate"]["resources"])
    )
    statement["subject"][0]["digest"]["sha256"] = root.hexdigest()
    _sign_statement(model, keys[0], statement)
    found = [f.rule for f in failing(model, keys[1])]
    assert found == ["TG507"]


def test_single_file(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00" * 1000)
    result = seal(weights, keys[0])
    assert result.signature == tmp_path / "model.bin.sig"
    assert [r.path for r in result.manifest.resources] == ["."]  # model-signing's name
    verify(weights, keys[1])
    weights.write_bytes(b"\x00" * 999 + b"\x01")
    (finding,) = failing(weights, keys[1])
    assert finding.rule == "TG503" and finding.file == str(weights)


def test_ignore_patterns_and_paths(model: Path, keys: tuple[Path, Path]) -> None:
    (model / "run.tmp").write_text("scratch")
    (model / "logs").mkdir()
    (model / "logs" / "a.log").write_text("x")
    result = seal(model, keys[0], ignore=["*.tmp", "logs"])
    params = result.manifest.serialization.params()
    assert "logs" in params["ignore_paths"] and "run.tmp" in params["ignore_paths"]
    assert params["ignore_patterns"] == ["*.tmp"]
    (model / "new.tmp").write_text("more scratch")  # matched by the signed pattern
    (model / "logs" / "b.log").write_text("y")
    (model / ".git" / "ORIG_HEAD").write_text("z")
    verify(model, keys[1])
    (model / "README").write_text("not sealed")
    verify(model, keys[1], ignore=["README"])  # the verifier may leave out more
    with pytest.raises(Exception, match="relative"):
        seal(model, keys[0], ignore=["../x"])


def test_cli_exit_codes_and_formats(
    model: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["seal", str(model), "--key", str(keys[0]), "--no-progress"]) == 0
    assert "PRIVATE" not in capsys.readouterr().err
    assert main(["verify", str(model), "--key", str(keys[1])]) == 0
    assert "verified 4 files" in capsys.readouterr().err
    (model / "config.json").write_text("{}")
    assert main(["verify", str(model), "--key", str(keys[1]), "-f", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    findings = [f for file in doc["files"] for f in file["findings"]]
    assert [f["rule"] for f in findings] == ["TG503"]
    assert len(findings[0]["evidence"]["actual_digest"]) == 64
    sarif_path = model.parent / "out.sarif"
    args = ["verify", str(model), "--key", str(keys[1]), "-f", "sarif", "-o", str(sarif_path)]
    assert main(args) == 1
    sarif = json.loads(sarif_path.read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "TG503"
    # Could not check at all: exit 2, never 0.
    assert main(["verify", str(model), "--key", str(keys[1]), "--signature", "nope"]) == 2
    assert main(["verify", str(model), "--key", str(keys[0])]) == 2  # a private key
    assert (
        main(["seal", str(model), "--key", str(keys[0]), "--hash", "blake3", "--shard-size", "1M"])
        == 2
    )


def test_empty_files_in_shards_mode(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0], shard_size=SHARD)
    (model / "shards" / "empty.bin").write_bytes(b"now data")
    (model / "config.json").write_bytes(b"")
    (model / "new_empty").write_bytes(b"")
    found = {Path(f.file).name: (f.rule, str(f.severity)) for f in failing(model, keys[1])}
    assert found == {
        "empty.bin": ("TG503", "critical"),
        "config.json": ("TG503", "critical"),
        "new_empty": ("TG504", "high"),
    }


def test_report_from_verify_report_lists_every_file(model: Path, keys: tuple[Path, Path]) -> None:
    seal(model, keys[0], hash="blake3")
    result = verify_report(model, keys[1])
    assert result.manifest is not None and result.manifest.serialization.hash_type == "blake3"
    assert len(result.report.files) == 5  # the signature and four files
    assert result.report.exit_code() == 0
