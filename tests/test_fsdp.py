"""trainguard.watch on sharded runs with real torch.distributed (gloo, CPU).

Two launches, each running several phases in one process group (tests/fsdp_worker.py:
starting torch and the group was most of the time when each scenario had its own):

* 4 ranks: ZeroRedundancyOptimizer with one rank's weights changed outside the step;
  HSDP (``fully_shard`` on a 2x2 mesh, replicate x shard) the same; FSDP2 with a
  sabotage installed but below its scale (honest: nothing at high/critical, the ledger
  verifies); then a rank that hangs alive, named by the survivors.
* 8 ranks: FSDP2 with a patch that arms on one rank at a random step, named at that
  step by that rank; then a rank killed: named stopped (TG1311) by the survivors, and
  only it; survivors still blocked in a collective are named blocked (TG1314).

Uneven and empty shards; every rank fingerprints only its own slice.  Ranks, steps and
kinds are drawn from a fresh seed on each run (printed); bench/fsdp_ranks.py runs the
same scenarios at 16 and 32 ranks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
SERIOUS = ("high", "critical")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(folder: Path, world: int, phases: list[str], timeout: int = 300) -> list[dict[int, Any]]:
    """Run ``phases`` (fsdp_worker.py's specs) on ``world`` ranks; per phase, each rank's result."""
    argv = [str(world), str(_port()), str(folder), "+".join(phases)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fsdp_worker", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a run past its timeout ends with every rank
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    exits = folder / "exit.json"
    codes = {int(r): c for r, c in json.loads(exits.read_text()).items()} if exits.exists() else {}
    results: list[dict[int, Any]] = []
    for phase in range(len(phases)):
        per_rank: dict[int, Any] = {}
        for rank in range(world):
            out = folder / f"rank{rank}.{phase}.json"
            result = json.loads(out.read_text()) if out.exists() else {}
            per_rank[rank] = {**result, "returncode": codes.get(rank), "stderr": err[-2000:]}
        results.append(per_rank)
    return results


def serious(results: dict[int, Any]) -> list[dict[str, Any]]:
    from trainguard.rules import RULES

    return [
        a
        for r in results.values()
        for a in r.get("alerts", [])
        if str(a.get("severity") or RULES[a["rule"]].severity) in SERIOUS
    ]


def verify(ledger: Path, run_id: str = "fsdp-run") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "ledger",
            "verify",
            run_id,
            "--ledger",
            str(ledger),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Launch:
    seed: int
    drawn: dict[str, Any]
    folder: Path
    phases: list[dict[int, Any]]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    drawn = {
        "zero": (rng.randrange(4), rng.randrange(3, 8)),
        "hsdp": (rng.randrange(4), rng.randrange(3, 8)),
        "hang": (rng.randrange(4), rng.randrange(3, 8)),
    }
    print(f"seed {seed}: (rank, step) {drawn}")
    folder = tmp_path_factory.mktemp("fsdp4")
    phases = [
        "zero/tamper:{}:{}@12".format(*drawn["zero"]),
        "hsdp/tamper:{}:{}@12".format(*drawn["hsdp"]),
        # The sabotage is installed on every rank but arms only at 8 ranks or more: at 4
        # the run is honest, and must look it.  After the ZeRO phase, whose start-up
        # audit must stay quiet with nothing installed.
        "fsdp/scaled:flip:1:5:8@12",
        "fsdp/hang:{}:{}@12".format(*drawn["hang"]),
    ]
    yield Launch(seed, drawn, folder, launch(folder, 4, phases))


@pytest.fixture(scope="module")
def eight_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    world = 8
    # 13 rows in shards of ceil(13 / world): the last ranks may hold no element at all,
    # and a patch there changes nothing; the target holds some.
    chunk = -(-13 // world)
    drawn = {
        "kind": rng.choice(["flip", "scale"]),
        "target": rng.randrange(-(-13 // chunk)),
        "at": rng.randrange(6, 11),
        "killed": (rng.randrange(1, world), rng.randrange(3, 8)),
    }
    print(f"seed {seed}: {drawn}")
    folder = tmp_path_factory.mktemp("fsdp8")
    phases = [
        "fsdp/scaled:{kind}:{target}:{at}:8@{steps}".format(**drawn, steps=drawn["at"] + 4),
        "fsdp/kill:{}:{}@14".format(*drawn["killed"]),
    ]
    yield Launch(seed, drawn, folder, launch(folder, world, phases))


def test_zero_tampered_rank_is_named_and_nothing_before(four_ranks: Launch) -> None:
    # ZeroRedundancyOptimizer: parameters replicated (compared between ranks), the
    # optimizer state sharded (each rank's own).  Until the tampering the run is honest.
    results, (target, at) = four_ranks.phases[0], four_ranks.drawn["zero"]
    seed = four_ranks.seed
    assert all(r.get("error") is None and "alerts" in r for r in results.values()), results
    # The start-up audit once took ZeroRedundancyOptimizer's Join machinery
    # (abc.abstractmethod, from a frozen module) for foreign code: no exception now.
    found = serious(results)
    assert found and min(a["step"] for a in found) == at + 1, (seed, found)
    assert ("TG1301", at + 1) in {(a["rule"], a["step"]) for a in results[target]["alerts"]}


def test_hsdp_tampered_rank_is_named_with_its_shard(four_ranks: Launch) -> None:
    # HSDP on a 2x2 mesh: rank = 2 * replica + shard; ranks t and t ^ 2 hold the same
    # shard (the same label).  One of them changed outside the step is named by its own
    # check at the next step (TG1301, with the shard's label) and by the replica group's
    # comparison at the next rank sync (TG1310: a group of two has no majority, so both
    # holders are named, with the shard).  Nothing before.
    results, (target, at) = four_ranks.phases[1], four_ranks.drawn["hsdp"]
    seed = four_ranks.seed
    assert all(r.get("error") is None and "alerts" in r for r in results.values()), results
    found = serious(results)
    assert found and min(a["step"] for a in found) == at + 1, (seed, found)
    own = [a for a in results[target]["alerts"] if a["rule"] == "TG1301" and a["step"] == at + 1]
    assert own and own[0]["rank"] == target, (seed, found)
    assert any("[" in t for t in own[0]["evidence"]["tensors"]), own  # a shard, not a whole
    sync = next(s for s in range(at + 1, 12) if (s + 1) % 5 == 0)
    compared = [a for a in found if a["rule"] == "TG1310" and a["step"] == sync]
    assert compared, (seed, found)
    shards = compared[0]["evidence"]["shards"]
    assert set(compared[0]["evidence"]["ranks"]) == {target, target ^ 2}, (seed, compared)
    assert any("[" in label for label in shards[str(target)]), compared
    # Only the tampered replica group: the other shard's holders agree.
    assert {a["rank"] for a in found if a["rule"] == "TG1301"} == {target}, (seed, found)


def test_patch_below_its_scale_stays_quiet_and_the_ledger_verifies(four_ranks: Launch) -> None:
    results = four_ranks.phases[2]
    assert all(r.get("error") is None and "alerts" in r for r in results.values()), results
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found == [], found  # (the start-up identity report names the installed patch)
    checked = verify(four_ranks.folder / "ledger.2.sqlite")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_hung_rank_is_named_by_a_survivor(four_ranks: Launch) -> None:
    # The hung rank stays alive and silent, outside any collective, past the process
    # group's timeout: the survivors' collective fails and they name the rank that did
    # not say it failed; it wrote no note of waiting in a collective, so it is stopped,
    # not blocked.
    results, (target, at) = four_ranks.phases[3], four_ranks.drawn["hang"]
    assert results[target]["returncode"] == 18, results[target]
    named = {
        (rank, a["rule"], a["evidence"].get("stopped_rank", a["evidence"].get("blocked_rank")))
        for rank, r in results.items()
        if rank != target
        for a in r.get("alerts", [])
        if a["rule"] in ("TG1311", "TG1314")
    }
    stopped = {
        (a["evidence"]["stopped_rank"], a["evidence"]["last_step"])
        for rank, r in results.items()
        if rank != target
        for a in r.get("alerts", [])
        if a["rule"] == "TG1311"
    }
    assert stopped == {(target, at)}, (four_ranks.seed, named)


def test_scale_triggered_patch_is_named_at_its_step(eight_ranks: Launch) -> None:
    # One 8-rank run in CI (2 cores); bench/fsdp_ranks.py runs both kinds at 16 and 32.
    results, drawn, seed = eight_ranks.phases[0], eight_ranks.drawn, eight_ranks.seed
    target, at = drawn["target"], drawn["at"]
    # The patch itself is installed before watch() on every rank, and the start-up
    # identity report names it (TG1304 at_start); what this test is about is the
    # effect, which arms at step `at` on one rank only.
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    assert found, results[target]
    assert min(a["step"] for a in found) >= at, (seed, found)  # nothing before the trigger
    first = [a for a in found if a["step"] <= at + 2]
    assert first, (seed, found)
    # Named: the alert is that rank's own, or a peer's that names it.
    assert all(a["rank"] == target or target in a["evidence"].get("ranks", []) for a in first)
    assert {a["rule"] for a in first} <= {"TG1301", "TG1306", "TG1310"}, first


def test_killed_rank_is_the_only_one_named_stopped(eight_ranks: Launch) -> None:
    # Gloo's ring puts only the dead rank's neighbours in error at once; the other
    # survivors stay blocked in the collective until the process group's timeout, longer
    # than the grace period their peers judge in.  Their watchdogs' notes say they are
    # alive: they are named blocked (TG1314, with the collective), never stopped.
    results, seed = eight_ranks.phases[1], eight_ranks.seed
    target, at = eight_ranks.drawn["killed"]
    assert results[target]["returncode"] == 17
    alerts = [
        (rank, a) for rank, r in results.items() if rank != target for a in r.get("alerts", [])
    ]
    stopped = [a["evidence"] for _, a in alerts if a["rule"] == "TG1311"]
    assert stopped, results
    assert {(e["stopped_rank"], e["last_step"]) for e in stopped} == {(target, at)}, (seed, alerts)
    blocked = [a["evidence"] for _, a in alerts if a["rule"] == "TG1314"]
    print(
        f"seed {seed}: {len(stopped)} TG1311, blocked ranks {[e['blocked_rank'] for e in blocked]}"
    )
    for e in blocked:
        assert e["blocked_rank"] != target and e["behind"] == [target], (seed, e)
        assert isinstance(e["collective"], str) and e["collective"], e
