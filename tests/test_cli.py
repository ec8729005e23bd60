"""The CLI end to end: exit codes, formats, policy and strictness."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import call1
from trainguard.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    (tmp_path / "clean.pkl").write_bytes(pickle.dumps({"lr": 0.1, "steps": [1, 2]}))
    (tmp_path / "user.pkl").write_bytes(call1("mypkg.models", "Net", "x"))
    return tmp_path


def test_clean_exits_0(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(store / "clean.pkl")]) == 0
    assert "OK" in capsys.readouterr().out


def test_medium_passes_by_default_and_fails_with_strict(store: Path) -> None:
    assert main(["scan", str(store)]) == 0
    assert main(["scan", "--strict", str(store)]) == 1
    assert main(["scan", "--fail-on", "low", str(store)]) == 1


def test_critical_exits_1_with_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    assert main(["scan", "--format", "json", str(store)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "critical" and doc["exit_code"] == 1
    evil = next(f for f in doc["files"] if f["path"].endswith("evil.bin"))
    assert evil["findings"][0]["rule"] == "TG101"
    assert evil["findings"][0]["trigger"] == "os.system"


def test_sarif_output_file(store: Path, tmp_path: Path) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    out = tmp_path / "out.sarif"
    assert main(["scan", "--format", "sarif", "-o", str(out), str(store)]) == 1
    doc = json.loads(out.read_text())
    assert doc["version"] == "2.1.0"
    assert any(r["ruleId"] == "TG101" for r in doc["runs"][0]["results"])


def test_policy_allows_user_class(store: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\nglobals = ["mypkg.models"]\n')
    assert main(["scan", "--strict", "--policy", str(policy), str(store)]) == 0


def test_policy_cannot_allow_os_system(store: Path, tmp_path: Path) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\nglobals = ["os", "os.system"]\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 1


def test_policy_severity_change(store: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[severity]\nTG103 = "high"\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 1


def test_bad_policy_is_usage_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[severity]\nTG999 = "loud"\n[allow]\nglobals = "x"\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 2
    err = capsys.readouterr().err
    assert "TG999" in err and "globals must be a list" in err


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    assert main(["scan", str(tmp_path / "nope")]) == 2


def test_unknown_file_is_info_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["scan", "--format", "json", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"][0]["findings"][0]["rule"] == "TG001"


def test_rules_markdown_matches_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "rules.md").read_text()


def test_python_dash_m_entry_point(store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainguard", "scan", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
