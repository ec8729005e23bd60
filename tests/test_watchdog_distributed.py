"""The watchdog with real torch.distributed (gloo on CPU, 2 processes): one rank stalls in
its own code while its peer waits in an all_reduce.  Both stop advancing; each rank's
alert says where it is, so the ledger tells the rank that hangs from the one that waits.
With on_hang="abort" the stalled rank ends and its peer records that it stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
STALL_STEP = 12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(tmp_path: Path, scenario: str, world: int = 2) -> dict[int, dict[str, Any]]:
    port = _port()
    ledger = tmp_path / "ledger.sqlite"
    procs = []
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        argv = [str(rank), str(world), str(port), str(ledger), str(out), scenario]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.watchdog_worker", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((rank, out, proc))
    results: dict[int, dict[str, Any]] = {}
    for rank, out, proc in procs:
        _, err = proc.communicate(timeout=240)
        result = json.loads(out.read_text()) if out.exists() else {}
        results[rank] = {**result, "returncode": proc.returncode, "stderr": err[-3000:]}
    return results


def _stalls(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in result.get("alerts", []) if a["rule"] == "TG1313"]


def test_stalled_rank_and_waiting_peer_are_both_recorded(tmp_path: Path) -> None:
    results = launch(tmp_path, f"stall:1:{STALL_STEP}")
    assert all(r["returncode"] == 0 and r["error"] is None for r in results.values()), results
    stalled, waiting = _stalls(results[1]), _stalls(results[0])
    assert [(a["step"], a["rank"]) for a in stalled] == [(STALL_STEP, 1)], results[1]
    assert [(a["step"], a["rank"]) for a in waiting] == [(STALL_STEP, 0)], results[0]
    for alert in stalled + waiting:
        assert alert["evidence"]["last_step"] == STALL_STEP - 1
    # The rank that hangs is in its own code; its peer waits for it in the collective.
    assert stalled[0]["evidence"]["collective"] is None
    assert " in stalled_step" in stalled[0]["evidence"]["stack"][-1]
    assert waiting[0]["evidence"]["collective"] == "all_reduce"
    assert any(" in main" in line for line in waiting[0]["evidence"]["stack"])
    # Training went on afterwards and the ranks still agree.
    other = [a["rule"] for r in results.values() for a in r["alerts"] if a["rule"] != "TG1313"]
    assert set(other) <= {"TG1307"}  # the long step itself, when it finally ended

    from trainguard.ledger import open_ledger

    with open_ledger(str(tmp_path / "ledger.sqlite"), create=False) as ledger:
        records = list(ledger.records("stall-run"))
    recorded = {
        r.stream: (r.step, r.payload["evidence"]["collective"])
        for r in records
        if r.kind == "alert" and r.payload["rule"] == "TG1313"
    }
    assert recorded == {0: (STALL_STEP, "all_reduce"), 1: (STALL_STEP, None)}
    assert {r.stream for r in records if r.kind == "stall-end"} == {0, 1}


def test_abort_ends_the_stalled_rank_and_its_peer_records_it(tmp_path: Path) -> None:
    from trainguard.monitor.watchdog import HANG_EXIT_CODE

    results = launch(tmp_path, f"abort:1:{STALL_STEP}")
    assert results[1]["returncode"] == HANG_EXIT_CODE, results[1]["stderr"]
    assert "stalled_step" in results[1]["stderr"]  # the thread dump in the rank's log
    assert results[0]["error"] is not None  # its all_reduce failed when the peer ended
    stopped = [a for a in results[0]["alerts"] if a["rule"] == "TG1311"]
    assert [a["evidence"]["stopped_rank"] for a in stopped] == [1]
    # Named after the last step it finished; its last record is the stall alert of the
    # step it never finished (read below).
    assert stopped[0]["evidence"]["last_step"] == STALL_STEP - 1

    from trainguard.ledger import open_ledger

    with open_ledger(str(tmp_path / "ledger.sqlite"), create=False) as ledger:
        rank1 = list(ledger.records("stall-run", stream=1))
    assert rank1[-1].kind == "alert" and rank1[-1].payload["rule"] == "TG1313"
    assert " in stalled_step" in rank1[-1].payload["evidence"]["stack"][-1]
