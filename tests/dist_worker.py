"""One rank of a small data-parallel run (gloo, CPU), for tests/test_watch_distributed.py.

Usage: python -m tests.dist_worker RANK WORLD PORT LEDGER OUT SCENARIO
SCENARIO: clean | tamper:RANK:STEP (alter that rank's weights after STEP) |
kill:RANK:STEP (that rank dies with SIGKILL after STEP).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainguard.monitor import guard as tgw

torch.set_num_threads(1)


def join(rank: int, world: int, port: int) -> None:
    """Join the run's gloo process group (the workers' common set-up)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def leave(guard: Any, out: str, error: str | None) -> None:
    """Close the guard, write this rank's result to ``out``, leave the group."""
    guard.close(RuntimeError(error) if error else None)
    with open(out, "w") as fh:
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
        json.dump({"error": error, "alerts": alerts}, fh, default=str)
    # Every rank leaves together: a rank whose peer (the store's host, rank 0) has already
    # exited can abort in gloo's teardown ("terminate called without an active exception").
    if error is None:
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ledger, out, scenario = sys.argv[4], sys.argv[5], sys.argv[6]
    join(rank, world, port)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = tgw.watch(model, opt, ledger=ledger, run_id="dist-run", sync_every=5)
    kind, *args = scenario.split(":")
    target = int(args[0]) if args else -1
    at = int(args[1]) if args else -1
    g = torch.Generator().manual_seed(100 + rank)
    error = None
    try:
        for step in range(60):
            x = torch.randn(16, 8, generator=g)
            loss = ((model(x) - x[:, :1]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=x)
            if rank == target and step == at:
                if kind == "tamper":
                    with torch.no_grad():
                        model.module[0].weight.add_(1e-3)
                elif kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
    except Exception as exc:  # a dead peer breaks the next collective
        error = repr(exc)[:300]
    finally:
        leave(guard, out, error)


if __name__ == "__main__":
    main()
