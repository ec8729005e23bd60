"""One rank of a small FSDP2 run (``fully_shard``, gloo, CPU), for tests/test_fsdp.py and
bench/fsdp_ranks.py.

Usage: python -m tests.fsdp_worker RANK WORLD PORT LEDGER OUT SCENARIO [STEPS [WRAP]]
WRAP: fsdp (default: fully_shard per layer) or zero (DDP with ZeroRedundancyOptimizer:
parameters replicated, optimizer state sharded).
SCENARIO:
  clean
  scaled:KIND:RANK:STEP:WORLD  the cluster's optimizer is patched on every rank (the
      same code everywhere, installed before watch, as an edited PyTorch would be); the
      patch arms at STEP on RANK only when the world size is at least WORLD.  KIND:
      flip  (gradients negated before the update: the incident's flipped clipping) or
      scale (the update applied three times over, after the optimizer's own step).
  kill:RANK:STEP  that rank dies with os._exit after STEP.
  tamper:RANK:STEP  that rank's weights are changed after STEP, outside the optimizer.
  hang:RANK:STEP  that rank stops after STEP (sleeps, alive) for longer than the
      process group's timeout (HANG_TIMEOUT here), then exits: its peers' next
      collective fails and they name it.
The layer sizes (7 -> 13 -> 3) do not divide by the world size: shards are uneven and
some are empty.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

from tests.dist_worker import join, leave
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)
HANG_SECONDS = 30.0
HANG_TIMEOUT = 10.0  # the process group's timeout in the hang scenario


def patch_optimizer(kind: str, target: int, at: int, threshold: int) -> None:
    """The sabotage: a wrapper around AdamW.step that arms at one rank of large jobs."""
    import torch.distributed as dist

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


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ledger, out, scenario = sys.argv[4], sys.argv[5], sys.argv[6]
    steps = int(sys.argv[7]) if len(sys.argv) > 7 else 30
    kind, *args = scenario.split(":")
    if kind == "scaled":
        patch_optimizer(args[0], int(args[1]), int(args[2]), int(args[3]))
    if kind == "hang":
        # A short collective timeout, so that the peers give up on the hung rank soon.
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=HANG_TIMEOUT),
        )
    else:
        join(rank, world, port)
    wrap = sys.argv[8] if len(sys.argv) > 8 else "fsdp"
    torch.manual_seed(0)
    model: Any = torch.nn.Sequential(
        torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)
    )
    opt: Any
    if wrap == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=0.01
        )
    else:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    guard = tgw.watch(
        model, opt, ledger=ledger, run_id="fsdp-run", sync_every=5, hang_seconds=HANG_SECONDS
    )
    target = int(args[0]) if kind in ("kill", "tamper", "hang") else -1
    at = int(args[1]) if kind in ("kill", "tamper", "hang") else -1
    g = torch.Generator().manual_seed(100 + rank)
    error = None
    overheads: list[float] = []  # the guard's own seconds per step (bench/fsdp_ranks.py)
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
                    # Alive but silent past the peers' timeout and their grace period.
                    time.sleep(HANG_TIMEOUT + 25.0)
                    os._exit(18)
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)  # the local slice under FSDP
    except Exception as exc:  # a dead peer breaks the next collective
        error = repr(exc)[:300]
    finally:
        stats = {"overheads": overheads, "sync_bytes": getattr(guard, "sync_bytes", 0)}
        with open(out + ".stats", "w") as fh:
            json.dump(stats, fh)
        leave(guard, out, error)


if __name__ == "__main__":
    main()
