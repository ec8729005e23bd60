"""A small data-parallel run (gloo, CPU) and its replay entry point, for tests/test_replay_ranks.py.

Usage: python -m tests.replay_ddp RANK WORLD PORT FOLDER RUN:SCENARIO...
SCENARIO: honest | poison:RANK:STEP (that rank negates its labels from STEP on, in
training only: the entry point below is the honest code).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import trainguard
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 12, 6, 80, 8  # 5 steps per epoch per rank

torch.set_num_threads(1)


def parts(poison: tuple[int, int] | None = None) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    data = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=7)
    # Its own generator: a loader without one draws a seed from torch's global generator
    # at each epoch's start (docs/replay.md, the data contract).
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, sampler=sampler, generator=torch.Generator()
    )
    rank = dist.get_rank()
    done = [0]

    def epoch(e: int) -> Any:
        sampler.set_epoch(e)
        return loader

    def step(batch: Any) -> Any:
        xb, yb = batch
        if poison is not None and rank == poison[0] and done[0] >= poison[1]:
            yb = -yb  # the sabotage: this rank's labels
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done[0] += 1
        return loss

    return model, opt, loader, epoch, step


def build(ctx: ReplayContext) -> Replayable:
    model, opt, loader, epoch, step = parts()
    return Replayable(model, opt, batches=epochs_from(ctx.start, len(loader), epoch), step=step)


def train(folder: Path, run_id: str, scenario: str) -> None:
    kind, *args = scenario.split(":")
    poison = (int(args[0]), int(args[1])) if kind == "poison" else None
    model, opt, loader, epoch, step = parts(poison)
    rank = dist.get_rank()
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id=run_id, key=KEY, hang_seconds=None
    )
    guard.checkpoint(folder / f"{run_id}-r{rank}-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        batch = next(batches)
        loss = step(batch)
        guard.step(loss=loss, batch=batch)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-r{rank}-{s + 1}.pt")
    guard.close()


def main() -> None:
    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    for job in sys.argv[5:]:
        run_id, _, scenario = job.partition(":")
        train(Path(folder), run_id, scenario)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
