"""One rank of DistributedDataParallel (world size 1, gloo) whose loop starts gradient
accumulation under ``no_sync()`` mid-run; prints the guard's alerts as JSON.

``python tests/nosync_worker.py SEED STORE``: two runs, one JSON line each: ``honest``,
and ``unsynced`` (at one step after accumulation began, the last micro-step also runs
under ``no_sync()``: that step's gradients are not averaged across ranks).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys

import torch
import torch.distributed as dist

from trainguard.monitor import guard as tgw


def main() -> None:
    seed, store = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    for mode in ("honest", "unsynced"):
        print(json.dumps(run(random.Random(f"{seed} {mode}"), mode)), flush=True)
    dist.destroy_process_group()


def run(rng: random.Random, mode: str) -> dict[str, object]:
    torch.manual_seed(rng.randrange(2**31))
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt: torch.optim.Optimizer = rng.choice([torch.optim.SGD, torch.optim.AdamW])(
        model.parameters(), lr=1e-3
    )
    begin = rng.randrange(6, 16)  # past the settings check's warm-up (4 steps)
    micro = rng.randrange(2, 5)
    steps = begin + 8
    bad = rng.randrange(begin, steps) if mode == "unsynced" else -1
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=30.0)
    for step in range(steps):
        n = micro if step >= begin else 1
        opt.zero_grad()
        for i in range(n):
            synced = i == n - 1 and step != bad
            with contextlib.nullcontext() if synced else model.no_sync():
                loss = model(torch.randn(16, 8)).pow(2).mean() / n
                loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        guard.step(loss=loss)
    guard.close()
    alerts = [[a.rule, a.step, int(a.severity), a.message] for a in guard.alerts]
    return {"mode": mode, "bad": bad, "begin": begin, "micro": micro, "alerts": alerts}


if __name__ == "__main__":
    main()
