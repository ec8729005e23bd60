"""One rank of a small gloo run in which one rank stalls, for tests/test_watchdog_distributed.py.

Usage: python -m tests.watchdog_worker RANK WORLD PORT LEDGER OUT SCENARIO
SCENARIO:
  stall:RANK:STEP  that rank stalls in its step STEP, before the step's all_reduce, until
                   every rank's watchdog has reported (the others wait in the all_reduce);
                   then all go on to the end
  abort:RANK:STEP  that rank stalls in step STEP for good, with on_hang="abort"
Each rank writes a marker file LEDGER.stalled-rankN when its watchdog reports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.dist_worker import join, leave
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)
STEPS = 20
HANG_SECONDS = 0.5


def stalled_step(markers: list[Path], forever: bool) -> None:
    """Hangs: naps until every rank's watchdog reported (or for good), at most a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (forever or not all(m.exists() for m in markers)):
        time.sleep(0.01)


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ledger, out, scenario = sys.argv[4], sys.argv[5], sys.argv[6]
    kind, target, at = scenario.split(":")
    markers = [Path(f"{ledger}.stalled-rank{r}") for r in range(world)]
    join(rank, world, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def reported(alert: Any) -> None:
        markers[rank].touch()

    aborts = kind == "abort" and rank == int(target)
    guard = tgw.watch(
        model,
        opt,
        ledger=ledger,
        run_id="stall-run",
        sync_every=5,
        hang_seconds=HANG_SECONDS,
        on_hang="abort" if aborts else reported,
    )
    g = torch.Generator().manual_seed(100 + rank)
    error = None
    try:
        for step in range(STEPS):
            x = torch.randn(16, 8, generator=g)
            loss = ((model(x) - x[:, :1]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            if rank == int(target) and step == int(at):
                stalled_step(markers, forever=aborts)
            for p in model.parameters():  # data parallel by hand: average the gradients
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            guard.step(loss=loss, batch=x)
    except Exception as exc:  # a peer that ended breaks the next collective
        error = repr(exc)[:300]
    finally:
        leave(guard, out, error)


if __name__ == "__main__":
    main()
