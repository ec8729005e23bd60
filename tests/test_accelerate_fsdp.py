"""trainguard.watch on FSDP2 prepared by Hugging Face Accelerate, and through the
Hugging Face Trainer with HFWatchCallback (gloo, CPU, 2 ranks; tests/accelerate_worker.py).

Accelerate 1.16 drops an FSDP plugin on CPU (the worker's docstring says where and
how it is forced on); the tests assert what Accelerate chose by itself (multi-CPU DDP)
and that what was watched is the sharded model (DTensor parameters).  An honest run
raises nothing at high/critical and its ledger verifies; AdamW patched on every rank
and armed on one random rank at a random optimizer step is named at that step by
that rank.  The seed is printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from tests.test_fsdp import ROOT, _port, serious, verify

WORLD = 2


def launch(folder: Path, how: str, scenario: str, steps: int) -> dict[int, Any]:
    argv = [str(WORLD), str(_port()), str(folder), how, scenario, str(steps)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.accelerate_worker", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    codes = json.loads((folder / "exit.json").read_text())
    results = {}
    for rank in range(WORLD):
        out = folder / f"rank{rank}.json"
        result = json.loads(out.read_text()) if out.exists() else {}
        results[rank] = {**result, "returncode": codes.get(str(rank)), "stderr": err[-3000:]}
    return results


def _sharded(results: dict[int, Any]) -> None:
    for r in results.values():
        assert r.get("error") is None and r["returncode"] == 0, r
        assert r["chosen"] == "MULTI_CPU", r  # what Accelerate picked on its own: no FSDP
        assert r["param"] == "DTensor", r  # what was watched: FSDP2's sharded parameters


@pytest.mark.parametrize("how", ["loop", "trainer"])
def test_honest_run_is_quiet_and_its_ledger_verifies(tmp_path: Path, how: str) -> None:
    results = launch(tmp_path, how, "clean", 10)
    _sharded(results)
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found == [], found
    checked = verify(tmp_path / "ledger.sqlite", "acc-run")
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("how", ["loop", "trainer"])
def test_one_rank_patch_is_named_at_its_step(tmp_path: Path, how: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    target, at = rng.randrange(WORLD), rng.randrange(3, 7)
    print(f"seed {seed}: {how}, flip on rank {target} from optimizer step {at}")
    results = launch(tmp_path, how, f"flip:{target}:{at}", at + 3)
    _sharded(results)
    # The patch is installed before watch() on every rank (the start-up identity report
    # names it, at_start); its effect arms at step `at` on one rank.
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found, (seed, results[target]["alerts"])
    assert min(a["step"] for a in found) == at, (seed, found)
    first = [a for a in found if a["step"] == at]
    assert all(a["rank"] == target or target in a["evidence"].get("ranks", []) for a in first)
    assert any(a["rank"] == target for a in first), (seed, first)
