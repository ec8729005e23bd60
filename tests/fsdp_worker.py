"""One rank of small sharded runs (gloo, CPU), for tests/test_fsdp.py and bench/fsdp_ranks.py.

Usage: python -m tests.fsdp_worker WORLD PORT DIR PHASES
The process imports torch and trainguard once, then forks WORLD rank processes (as a
DataLoader forks its workers; nothing distributed exists before the fork): on 2 cores,
each rank importing torch itself took longer than the training.  It writes each rank's
exit code to DIR/exit.json.
PHASES: one or more ``WRAP/SCENARIO@STEPS`` joined by ``+``, run one after the other in
the same process group (a process group's start-up is much of a short run's time).
Phase i writes DIR/ledger.i.sqlite (run id ``fsdp-run``), each rank's alerts to
DIR/rank{RANK}.i.json and its guard's costs to DIR/rank{RANK}.i.json.stats.
WRAP:
  fsdp  fully_shard per layer (default);
  hsdp  fully_shard on a 2-D mesh (replicate, shard): WORLD/2 shards, each held by a
        replica group of 2 ranks;
  zero  DDP with ZeroRedundancyOptimizer (parameters replicated, optimizer state sharded).
SCENARIO:
  clean
  scaled:KIND:RANK:STEP:WORLD  the cluster's optimizer is patched on every rank (the
      same code everywhere, installed before watch, as an edited PyTorch would be); the
      patch arms at STEP on RANK only when the world size is at least WORLD.  KIND:
      flip  (gradients negated before the update: the incident's flipped clipping) or
      scale (the update applied three times over, after the optimizer's own step).
      The patch is removed when the phase ends.
  tamper:RANK:STEP  that rank's weights are changed after STEP, outside the optimizer.
  kill:RANK:STEP  that rank dies with os._exit after STEP (a last phase).
  hang:RANK:STEP  that rank stops after STEP (sleeps, alive) until every peer has
      written its result, then exits (a last phase): its peers' next collective fails
      after the process group's timeout and they name it.
Before a kill or hang phase the process group's timeout, the guard's grace period for
failed ranks and the watchdog's note intervals are made short (FAIL_TIMEOUTS), so a
test hears of a dead rank in seconds; a kill's timeout stays longer than the grace
period, so survivors still blocked in a collective when their peers judge are alive
and must be told from the dead rank (TG1314, not TG1311).
The layer sizes (7 -> 13 -> 3) do not divide by the world size: shards are uneven and
some are empty.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from tests import own_state
from tests.dist_worker import join
from trainguard.monitor import distributed as tg_distributed
from trainguard.monitor import guard as tgw
from trainguard.monitor import watchdog as tg_watchdog

torch.set_num_threads(1)
HANG_SECONDS = 30.0  # the watchdog's stall threshold (TG1313): longer than any phase here
# Process-group timeout (seconds) for the phases where a rank stops.
FAIL_TIMEOUTS = {"kill": 10.0, "hang": 5.0}
FAILED_GRACE = 5.0  # distributed.FAILED_GRACE_SECONDS in those phases (15 s by default)
NOTE_AFTER, NOTE_EVERY = 1.0, 1.5  # the watchdog's rank-waiting notes in those phases
NOTE_FRESH = 4.0  # distributed.NOTE_FRESH_SECONDS in those phases
PRODUCTION_WAITS_TIMEOUT = 40.0  # longer than the default 15 s grace period
PEERS_WAIT = 120.0  # how long a hung rank waits for its peers' results, at most


def patch_optimizer(kind: str, target: int, at: int, threshold: int) -> Any:
    """The sabotage: a wrapper around AdamW.step that arms at one rank of large jobs.

    Returns the original, to put back when the phase ends."""
    original = torch.optim.AdamW.step
    calls = [0]

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        armed = dist.get_world_size() >= threshold and dist.get_rank() == target and calls[0] >= at
        calls[0] += 1
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if armed and kind == "flip":
            for p in params:
                p.grad.neg_()
        before = [p.detach().clone() for p in params] if armed and kind == "scale" else []
        out = original(self, *args, **kwargs)
        if before:
            with torch.no_grad():
                for p, b in zip(params, before, strict=True):
                    p.add_(2.0 * (p - b))
        return out

    torch.optim.AdamW.step = step  # type: ignore[method-assign]
    return original


def build(wrap: str, world: int) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model: Any = torch.nn.Sequential(
        torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)
    )
    if wrap == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=0.01
        )
        return model, opt
    mesh = None
    if wrap == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def short_failures(kind: str) -> None:
    """The kill and hang phases' short timeouts (see the module docstring).

    With FSDP_WORKER_DEFAULT_WAITS=1 in the environment (bench/fsdp_ranks.py) the
    guard keeps its own grace period and note intervals, and the process group's
    timeout is PRODUCTION_WAITS_TIMEOUT: the defaults a user gets, slower."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if os.environ.get("FSDP_WORKER_DEFAULT_WAITS") == "1":
        _set_pg_timeout(timedelta(seconds=PRODUCTION_WAITS_TIMEOUT))
        return
    _set_pg_timeout(timedelta(seconds=FAIL_TIMEOUTS[kind]))
    tg_distributed.FAILED_GRACE_SECONDS = FAILED_GRACE
    tg_watchdog.WAIT_NOTE_SECONDS, tg_watchdog.WAIT_NOTE_EVERY = NOTE_AFTER, NOTE_EVERY
    tg_distributed.NOTE_FRESH_SECONDS = NOTE_FRESH
    own_state.retake()  # set on purpose: the self-check takes them as they are now


def wait_for_peers(rank: int, world: int, folder: Path, phase: int) -> None:
    deadline = time.monotonic() + PEERS_WAIT
    peers = [folder / f"rank{r}.{phase}.json" for r in range(world) if r != rank]
    while time.monotonic() < deadline and not all(p.exists() for p in peers):
        time.sleep(0.2)


def run_phase(rank: int, world: int, folder: Path, phase: int, spec: str) -> bool:
    """One phase; whether the process group is still usable after it."""
    wrap, _, rest = spec.rpartition("/")
    scenario, _, steps_text = rest.partition("@")
    steps = int(steps_text or 30)
    kind, *args = scenario.split(":")
    original = None
    if kind == "scaled":
        original = patch_optimizer(args[0], int(args[1]), int(args[2]), int(args[3]))
    if kind in FAIL_TIMEOUTS:
        short_failures(kind)
    model, opt = build(wrap or "fsdp", world)
    ledger = str(folder / f"ledger.{phase}.sqlite")
    guard = tgw.watch(
        model, opt, ledger=ledger, run_id="fsdp-run", sync_every=5, hang_seconds=HANG_SECONDS
    )
    target = int(args[0]) if kind in ("kill", "tamper", "hang") else -1
    at = int(args[1]) if kind in ("kill", "tamper", "hang") else -1
    g = torch.Generator().manual_seed(100 + rank)
    error = None
    overheads: list[float] = []  # the guard's own seconds per step (bench/fsdp_ranks.py)
    out = folder / f"rank{rank}.{phase}.json"
    try:
        for step in range(steps):
            x = torch.randn(8, 7, generator=g)
            loss = ((model(x) - x[:, :3]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=x)
            overheads.append(guard.last_step_overhead)
            if rank == target and step == at:
                if kind == "kill":
                    os._exit(17)
                if kind == "hang":
                    # Alive but silent until every peer has judged.
                    wait_for_peers(rank, world, folder, phase)
                    os._exit(18)
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)  # the local slice when sharded
    except Exception as exc:  # a dead peer breaks the next collective
        error = repr(exc)[:300]
    finally:
        if original is not None:
            torch.optim.AdamW.step = original  # type: ignore[method-assign]
        stats = {"overheads": overheads, "sync_bytes": getattr(guard, "sync_bytes", 0)}
        Path(f"{out}.stats").write_text(json.dumps(stats))
        guard.close(RuntimeError(error) if error else None)
        alerts = [
            {
                "rule": a.rule,
                "step": a.step,
                "rank": a.rank,
                "severity": str(a.severity),
                "evidence": a.evidence,
            }
            for a in guard.alerts
        ]
        out.write_text(json.dumps({"error": error, "alerts": alerts}, default=str))
    return error is None


def rank_main(rank: int, world: int, port: int, folder: Path, phases: list[str]) -> None:
    join(rank, world, port)
    for i, spec in enumerate(phases):
        if not run_phase(rank, world, folder, i, spec):
            break
        # Every rank leaves a phase together: the next phase's set-up (and gloo's
        # teardown at the end) must not race a peer still closing its guard.
        dist.barrier()
    dist.destroy_process_group()


# Modules a rank would import on first use: fully_shard's first call imports
# torch._dynamo (about 2 s of CPU per rank), watch() its run key's and ledger's.
PRELOAD = (
    "torch._dynamo",
    "torch.distributed.device_mesh",
    "torch.distributed.optim",
    "torch.distributed.tensor",
    "trainguard.ledger.runkey",
    "trainguard.ledger.sqlite_store",
    "trainguard.signing",
    "cProfile",
    "pstats",
)


def fork_ranks(world: int, run: Callable[[int], None], folder: Path) -> None:
    """Fork ``world`` processes, each running ``run(rank)``; their exit codes to DIR/exit.json."""
    for name in PRELOAD:  # once here rather than once per rank
        importlib.import_module(name)
    children: dict[int, int] = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(rank)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = rank
    codes: dict[int, int] = {}
    while children:
        pid, status = os.wait()
        if pid in children:
            codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
    (folder / "exit.json").write_text(json.dumps(codes))


def main() -> None:
    world, port = int(sys.argv[1]), int(sys.argv[2])
    folder, phases = Path(sys.argv[3]), sys.argv[4].split("+")
    fork_ranks(world, lambda rank: rank_main(rank, world, port, folder, phases), folder)


if __name__ == "__main__":
    main()
