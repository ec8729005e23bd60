"""Where developers already work: the pre-commit hook, the GitHub Action's step, the image.

Each is exercised the way its users run it, as far as this machine allows
without a network: the hook's manifest is validated by pre-commit's own loader
and its entry run on a fixture git repository's staged files; the action's
entrypoint runs with the INPUT_* variables GitHub sets; the image is built
only where a container runtime answers.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import call1

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MALICIOUS = call1("os", "system", "touch /nonexistent/canary")


def _git(repo: Path, *args: str) -> str:
    who = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env = {**os.environ, **who, "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)
    return out.stdout.decode()


def _hooks() -> list[dict[str, object]]:
    clientlib = pytest.importorskip("pre_commit.clientlib")
    hooks: list[dict[str, object]] = clientlib.load_manifest(str(ROOT / ".pre-commit-hooks.yaml"))
    return hooks


def _run_hook(hook: dict[str, object], repo: Path) -> subprocess.CompletedProcess[str]:
    """What pre-commit does for a `language: python` hook: entry + args + staged file names."""
    staged = _git(repo, "diff", "--cached", "--name-only", "-z").split("\0")
    files = [f for f in staged if f]
    argv = shlex.split(str(hook["entry"])) + list(hook.get("args", []))  # type: ignore[call-overload]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*argv, *files], cwd=repo, capture_output=True, text=True, env=env)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    (tmp_path / "README.md").write_text("models\n")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02}q\x00.")  # an empty dict, protocol 2
    _git(tmp_path, "add", ".")
    return tmp_path


def test_the_hook_manifest_is_valid_for_pre_commit() -> None:
    ids = [h["id"] for h in _hooks()]
    assert ids == ["trainguard-scan", "trainguard-scan-strict"]


def test_the_hook_passes_a_clean_commit_and_fails_a_payload_renamed_to_txt(repo: Path) -> None:
    hook = _hooks()[0]
    clean = _run_hook(hook, repo)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    (repo / "notes.txt").write_bytes(MALICIOUS)  # judged by content, not by name
    _git(repo, "add", "notes.txt")
    caught = _run_hook(hook, repo)
    assert caught.returncode == 1
    assert "notes.txt" in caught.stdout and "os.system" in caught.stdout


def test_the_action_entrypoint_writes_sarif_and_a_summary(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ok.pt").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "models" / "bad.bin").write_bytes(MALICIOUS)
    (tmp_path / "models" / "skip.log").write_bytes(MALICIOUS)
    summary = tmp_path / "summary.md"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TRAINGUARD_ACTION_NO_INSTALL": "1",
        "INPUT_PATHS": "models",
        "INPUT_EXCLUDE": "*.log",
        "INPUT_SARIF": "out.sarif",
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    script = ROOT / "scripts" / "action-entrypoint.sh"
    run = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 1, run.stderr
    sarif = json.loads((tmp_path / "out.sarif").read_text())
    uris = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in sarif["runs"][0]["results"]
    }
    assert uris == {"models/bad.bin"}  # skip.log excluded
    assert "::error title=trainguard::" in run.stdout
    assert "TG101" in summary.read_text()

    (tmp_path / "models" / "bad.bin").unlink()
    clean = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    assert json.loads((tmp_path / "out.sarif").read_text())["runs"][0]["results"] == []


def test_the_dockerfile_runs_trainguard_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["trainguard"]' in text


def test_the_image_builds_and_scans_where_a_container_runtime_exists(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no container runtime answers here (docker info failed)")
    tag = "trainguard-test:ci"
    build = subprocess.run([docker, "build", "-q", "-t", tag, str(ROOT)], capture_output=True)
    if build.returncode != 0:
        pytest.skip(f"the image cannot be built here (no registry?): {build.stderr[-300:]!r}")
    (tmp_path / "bad.pt").write_bytes(MALICIOUS)
    run = subprocess.run(
        [docker, "run", "--rm", "-v", f"{tmp_path}:/data:ro", tag, "scan", "/data"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "os.system" in run.stdout
