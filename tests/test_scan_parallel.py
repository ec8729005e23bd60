"""Scans spread over worker processes and a real local Ray cluster give one process's report;
the walk's include/exclude globs and symlink handling."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import call1
from trainguard.findings import ScanReport
from trainguard.limits import DEFAULT_LIMITS
from trainguard.render.jsonfmt import report_dict
from trainguard.samples import build_all
from trainguard.scanner import Policy, scan
from trainguard.scanner.parallel import process_runner
from trainguard.scanner.walk import WalkOptions

MALICIOUS = call1("os", "system", "touch /nonexistent/canary")
CLEAN = pickle.dumps({"w": [1.0, 2.0]}, protocol=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sample the project builds (malicious and benign), in one folder tree."""
    root = tmp_path_factory.mktemp("corpus")
    build_all(root, root / "CANARY")
    return root


def _json(report: ScanReport) -> dict[str, object]:
    return report_dict(report, tool_version="x")


def test_worker_processes_give_the_same_report(corpus: Path) -> None:
    one = scan([corpus])
    runner = process_runner(2, Policy(), DEFAULT_LIMITS)
    many = scan([corpus], runner=runner)
    assert len(one.files) > 50
    assert _json(many) == _json(one)
    assert many.exit_code() == one.exit_code() == 1


def test_ray_local_cluster_gives_the_same_json_as_one_process(corpus: Path) -> None:
    """`trainguard scan --ray local DIR --format json` == `trainguard scan DIR --format json`."""
    pytest.importorskip("ray")
    base = [sys.executable, "-m", "trainguard", "scan", str(corpus), "--format", "json"]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    on_ray = subprocess.run(
        [*base, "--ray", "local"], capture_output=True, text=True, timeout=300, env=env
    )
    assert plain.returncode == on_ray.returncode == 1, on_ray.stderr[-2000:]
    assert json.loads(plain.stdout) == json.loads(on_ray.stdout)


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    (tmp_path / "runs" / "1").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(CLEAN)
    (tmp_path / "train.log").write_text("step 1\n")
    (tmp_path / "runs" / "1" / "ckpt.pt").write_bytes(MALICIOUS)

    def listed(**kw: list[str]) -> list[str]:
        opts = WalkOptions(include=kw.get("include", []), exclude=kw.get("exclude", []))
        report = scan([tmp_path], walk_options=opts)
        return sorted(Path(f.path).relative_to(tmp_path).as_posix() for f in report.files)

    assert listed() == ["model.pt", "runs/1/ckpt.pt", "train.log"]
    assert listed(exclude=["*.log"]) == ["model.pt", "runs/1/ckpt.pt"]
    assert listed(include=["runs/*"]) == ["runs/1/ckpt.pt"]
    assert listed(include=["*.pt"], exclude=["runs/*"]) == ["model.pt"]


def test_a_file_named_on_the_command_line_is_scanned_whatever_the_globs(tmp_path: Path) -> None:
    target = tmp_path / "x.log"
    target.write_bytes(MALICIOUS)
    report = scan([target], walk_options=WalkOptions(exclude=["*.log"]))
    assert report.exit_code() == 1


def test_symlink_loops_are_reported_not_walked_forever(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "m.pt").write_bytes(MALICIOUS)
    os.symlink("../..", tmp_path / "a" / "b" / "up")
    os.symlink(tmp_path / "a" / "b", tmp_path / "side")  # reached twice: not a loop

    unfollowed = scan([tmp_path])
    assert [Path(f.path).name for f in unfollowed.files] == ["m.pt"]

    followed = scan([tmp_path], walk_options=WalkOptions(follow_symlinks=True))
    names = sorted(Path(f.path).relative_to(tmp_path).as_posix() for f in followed.files)
    assert names == ["a/b/m.pt", "a/b/up", "side/m.pt", "side/up"]
    loops = [f for f in followed.files if f.format == "symlink"]
    assert len(loops) == 2 and all("symlink loop" in (f.error or "") for f in loops)
    assert followed.exit_code() == 1  # the findings outrank the errors


def test_cli_follow_symlinks_loop_alone_exits_2(tmp_path: Path) -> None:
    from trainguard.cli.main import main

    (tmp_path / "d").mkdir()
    os.symlink("..", tmp_path / "d" / "loop")
    assert main(["scan", str(tmp_path), "--follow-symlinks", "--no-progress"]) == 2


def test_a_file_that_vanishes_mid_scan_never_shifts_results_to_other_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.scanner import engine

    for name in ("a.pt", "b.pt", "c.pt"):
        (tmp_path / name).write_bytes(MALICIOUS if name == "c.pt" else CLEAN)
    looks: dict[str, int] = {}
    real = engine._exists

    def flaky(path: Path) -> bool:  # b.pt is there at the first look, gone at any later one
        looks[path.name] = looks.get(path.name, 0) + 1
        return real(path) and not (path.name == "b.pt" and looks[path.name] > 1)

    monkeypatch.setattr(engine, "_exists", flaky)
    report = scan([tmp_path])
    assert [Path(f.path).name for f in report.files] == ["a.pt", "b.pt", "c.pt"]
    by_name = {Path(f.path).name: f for f in report.files}
    assert by_name["c.pt"].findings and not by_name["a.pt"].findings
