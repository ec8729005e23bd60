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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from tests.test_fsdp import ROOT, _port, serious, verify

WORLD = 2


@dataclass
class Runs:
    seed: int
    target: int
    at: int
    folder: Path
    results: list[dict[int, Any]]  # the patched run, then an honest one


def launch(folder: Path, how: str, steps: int, scenarios: list[str]) -> list[dict[int, Any]]:
    argv = [str(WORLD), str(_port()), str(folder), how, str(steps), ",".join(scenarios)]
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
    runs = []
    for i in range(len(scenarios)):
        results = {}
        for rank in range(WORLD):
            out = folder / f"rank{rank}.{i}.json"
            result = json.loads(out.read_text()) if out.exists() else {}
            results[rank] = {**result, "returncode": codes.get(str(rank)), "stderr": err[-3000:]}
        runs.append(results)
    return runs


@pytest.fixture(scope="module", params=["loop", "trainer"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    target, at = rng.randrange(WORLD), rng.randrange(3, 7)
    print(f"seed {seed}: {request.param}, flip on rank {target} from optimizer step {at}")
    folder = tmp_path_factory.mktemp(request.param)
    # The patched run first: a patch installed after torch hooked AdamW.step (the first
    # AdamW made does that) calls the hooked step inside itself, and the guard's hooks
    # then run twice per step, the inner pair after the flip.  That evasion is the
    # guard's, reported separately; here the patch is what a process starts with.
    results = launch(folder, request.param, 10, [f"flip:{target}:{at}", "clean"])
    return Runs(seed, target, at, folder, results)


def _sharded(results: dict[int, Any], first: bool) -> None:
    for r in results.values():
        assert r.get("error") is None and r["returncode"] == 0, r
        if first:  # what Accelerate picked on its own (later runs share its state): no FSDP
            assert r["chosen"] == "MULTI_CPU", r
        assert r["param"] == "DTensor", r  # what was watched: FSDP2's sharded parameters


def test_honest_run_is_quiet_and_its_ledger_verifies(runs: Runs) -> None:
    results = runs.results[1]
    _sharded(results, first=False)
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found == [], found
    checked = verify(runs.folder / "ledger.1.sqlite", "acc-run")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_one_rank_patch_is_named_at_its_step(runs: Runs) -> None:
    results, target, at, seed = runs.results[0], runs.target, runs.at, runs.seed
    _sharded(results, first=True)
    # The patch is installed before watch() on every rank (the start-up identity report
    # names it, at_start); its effect arms at step `at` on one rank.
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found, (seed, results[target]["alerts"])
    assert min(a["step"] for a in found) == at, (seed, found)
    first = [a for a in found if a["step"] == at]
    assert all(a["rank"] == target or target in a["evidence"].get("ranks", []) for a in first)
    assert any(a["rank"] == target for a in first), (seed, first)
