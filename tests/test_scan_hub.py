"""``trainguard scan hf://ORG/REPO[@REVISION]`` against a local Hugging Face cache.

No network: each test lays out a cache the way huggingface_hub writes it
(``models--org--repo/refs/main``, ``snapshots/<commit>/`` of links into
``blobs/``) and scans it offline.  The CLI runs in a subprocess so that
``HF_HOME`` and ``HF_HUB_OFFLINE`` are read by a fresh huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.errors import MissingExtraError, UsageError
from trainguard.findings import Severity
from trainguard.samples.fmt_repo import REPOSITORIES
from trainguard.scanner import scan
from trainguard.scanner.hub import HubError, HubRef, parse, resolve_paths

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def make_cache(hub: Path, repo_id: str, files: Path, commit: str, refs: tuple[str, ...]) -> Path:
    """A snapshot of ``files`` in huggingface_hub's cache layout; returns its folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """HF_HOME with org/evil (main -> COMMIT, auto_map + modeling_evil.py) and org/clean."""
    home = tmp_path / "hf"
    for repo_id, sample, commit, refs in (
        ("org/evil", "repo-auto-map-modeling", COMMIT, ("main",)),
        ("org/evil", "repo-benign-bert", OLD_COMMIT, ("v1",)),
        ("org/clean", "repo-benign-bert", COMMIT, ("main",)),
    ):
        files = tmp_path / "src" / f"{repo_id}-{commit}"
        files.mkdir(parents=True)
        REPOSITORIES[sample].build(files, tmp_path / "canary")
        make_cache(home / "hub", repo_id, files, commit, refs)
    return home


def _cli(hf_home: Path, *args: str, offline_env: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(hf_home)
    # Any attempt to reach the network fails at once instead of waiting.
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "scan", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_parse() -> None:
    assert parse("hf://org/repo") == HubRef("org/repo", None)
    assert parse("hf://org/repo@v1.0") == HubRef("org/repo", "v1.0")
    assert parse("hf://gpt2@refs/pr/1") == HubRef("gpt2", "refs/pr/1")
    assert str(parse("hf://org/repo@main")) == "hf://org/repo@main"
    for bad in ("hf://", "hf://a/b/c", "hf://org/repo@", "hf://../x", "hf://org/a--b", "org/x"):
        with pytest.raises(UsageError):
            parse(bad)


def test_resolve_scan_and_pin(hf_home: Path) -> None:
    resolved = resolve_paths(["hf://org/evil"], offline=True, cache_dir=hf_home / "hub")
    (snap,) = resolved.snapshots
    assert snap.commit == COMMIT and snap.folder.name == COMMIT
    report = scan(resolved.paths)
    resolved.relabel(report)
    prefix = f"hf://org/evil@{COMMIT}"
    assert report.files[0].path == prefix
    (pin,) = report.files[0].findings
    assert pin.rule == "TG1410" and pin.severity == Severity.INFO
    assert pin.evidence["commit"] == COMMIT and pin.evidence["offline"] == "true"
    assert all(r.path.startswith(prefix) for r in report.files)
    assert all(f.file.startswith(prefix) for f in report.findings)
    paths = {r.path for r in report.files}
    assert f"{prefix}/modeling_evil.py" in paths and f"{prefix}/config.json" in paths
    assert report.verdict == Severity.HIGH


def test_branch_and_tag_resolve_to_their_commit(hf_home: Path) -> None:
    cache = hf_home / "hub"
    main = resolve_paths(["hf://org/evil@main"], offline=True, cache_dir=cache).snapshots[0]
    v1 = resolve_paths(["hf://org/evil@v1"], offline=True, cache_dir=cache).snapshots[0]
    pinned = resolve_paths([f"hf://org/evil@{OLD_COMMIT}"], offline=True, cache_dir=cache)
    assert (main.commit, v1.commit, pinned.snapshots[0].commit) == (COMMIT, OLD_COMMIT, OLD_COMMIT)
    assert v1.label == f"hf://org/evil@{OLD_COMMIT}"


def test_local_paths_pass_through(tmp_path: Path, hf_home: Path) -> None:
    resolved = resolve_paths([str(tmp_path)], offline=True, cache_dir=hf_home / "hub")
    assert resolved.paths == [str(tmp_path)] and resolved.snapshots == []


def test_missing_repository_offline_is_a_clear_error(hf_home: Path) -> None:
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        resolve_paths(["hf://org/missing"], offline=True, cache_dir=hf_home / "hub")
    with pytest.raises(HubError):
        resolve_paths(["hf://org/evil@no-such-branch"], offline=True, cache_dir=hf_home / "hub")


def test_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError, match=r"trainguard\[hub\]"):
        resolve_paths(["hf://org/evil"], offline=True)


def test_cli_scans_the_cache_offline(hf_home: Path) -> None:
    proc = _cli(hf_home, "hf://org/evil")
    assert proc.returncode == 1, proc.stderr
    assert f"hf://org/evil@{COMMIT}/modeling_evil.py" in proc.stdout
    assert "TG1401" in proc.stdout and "TG1402" in proc.stdout


def test_cli_json_pins_the_revision(hf_home: Path) -> None:
    proc = _cli(hf_home, "--format", "json", "hf://org/evil@main")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    pin = doc["files"][0]
    assert pin["path"] == f"hf://org/evil@{COMMIT}"
    assert pin["findings"][0]["evidence"]["requested_revision"] == "main"
    assert pin["findings"][0]["evidence"]["commit"] == COMMIT


def test_cli_offline_flag_and_clean_repository(hf_home: Path) -> None:
    proc = _cli(hf_home, "--offline", "hf://org/clean", offline_env=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_missing_repository_offline_exits_2(hf_home: Path) -> None:
    proc = _cli(hf_home, "hf://org/missing")
    assert proc.returncode == 2
    assert "hf://org/missing" in proc.stderr and "offline" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = _cli(hf_home, "hf://not/a/repo")
    assert bad.returncode == 2 and "expected hf://ORG/REPO" in bad.stderr
