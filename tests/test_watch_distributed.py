"""Multi-process runs with real torch.distributed (gloo on CPU): a tampered rank is named,
a killed rank is recorded with its last step, a clean run raises nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.cli.main import main

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(tmp_path: Path, world: int, scenario: str) -> dict[int, dict[str, Any]]:
    port = _port()
    ledger = tmp_path / "ledger.sqlite"
    procs = []
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        procs.append(
            (
                rank,
                out,
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.dist_worker",
                        str(rank),
                        str(world),
                        str(port),
                        str(ledger),
                        str(out),
                        scenario,
                    ],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    results = {}
    for rank, out, proc in procs:
        _, err = proc.communicate(timeout=240)
        if out.exists():
            results[rank] = json.loads(out.read_text())
        else:
            results[rank] = {"returncode": proc.returncode, "stderr": err[-500:]}
    return results


def test_clean_three_ranks(tmp_path: Path) -> None:
    results = launch(tmp_path, 3, "clean")
    # Three ranks on a shared two-core machine: a rank paused now and then is a single
    # medium step-time alert, and the start-up audit lists the hooks DDP installs at low;
    # anything else is a false alarm.
    assert all(
        [
            a
            for a in r.get("alerts", [])
            if (a["rule"], a["severity"]) != ("TG1307", "medium") and a["severity"] != "low"
        ]
        == []
        and r["error"] is None
        for r in results.values()
    ), results


@pytest.mark.parametrize("world", [2, 4])
def test_tampered_rank_is_named(tmp_path: Path, world: int) -> None:
    target = world - 1
    results = launch(tmp_path, world, f"tamper:{target}:22")
    own = [(a["rule"], a["step"]) for a in results[target]["alerts"]]
    assert ("TG1301", 23) in own  # the rank itself sees weights change outside its step
    disagreements = [a for a in results[0]["alerts"] if a["rule"] == "TG1310"]
    assert disagreements, results[0]
    assert disagreements[0]["step"] == 24  # the first exchange after the change
    if world > 2:
        assert disagreements[0]["evidence"]["ranks"] == [target]


def test_killed_rank_is_recorded_with_its_last_step(tmp_path: Path) -> None:
    results = launch(tmp_path, 2, "kill:1:30")
    assert "returncode" in results[1]  # rank 1 died without writing its report
    stopped = [a for a in results[0]["alerts"] if a["rule"] == "TG1311"]
    assert stopped and stopped[0]["evidence"]["stopped_rank"] == 1
    assert stopped[0]["evidence"]["last_step"] == 30
    # The ledger verifies: rank 1's missing run-end is explained by rank 0's alert.
    out = tmp_path / "verify.json"
    args = ["ledger", "verify", "dist-run", "--ledger", str(tmp_path / "ledger.sqlite")]
    assert main([*args, "-f", "json", "-o", str(out)]) == 0
    found = [f for f in json.loads(out.read_text())["findings"] if f["rule"] == "TG1211"]
    assert [f["severity"] for f in found] == ["medium"] and "died" in found[0]["message"]
