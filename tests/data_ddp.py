"""A two-rank run (gloo, CPU) over sealed data, and its replay entry point.

Usage: python -m tests.data_ddp RANK WORLD PORT FOLDER BAD_RANK STEP
The data (FOLDER/data, sealed with FOLDER/signer.pub) is made by the test.  Rank BAD_RANK
relabels one row of its batch at step STEP, in training only.  The folder reaches the entry
through the checkpoints' data_state.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import trainguard
from trainguard.data.sealed import SealedDataset
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from

KEY = bytes(range(32))
STEPS, EVERY, BATCH = 8, 4, 4

torch.set_num_threads(1)


def parts(folder: Path, rank: int) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data: Any = SealedDataset(folder / "data", folder / "signer.pub", rank=rank)
    sampler: Any = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=7)
    loader: Any = torch.utils.data.DataLoader(
        data, batch_size=BATCH, sampler=sampler, generator=torch.Generator()
    )

    def epoch(e: int) -> Any:
        sampler.set_epoch(e)
        return loader

    def step(batch: Any) -> Any:
        xb, yb = batch
        loss: Any = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, loader, epoch, step


def build(ctx: ReplayContext) -> Replayable:
    model, opt, loader, epoch, step = parts(Path(ctx.data_state["folder"]), ctx.rank)
    return Replayable(
        model, opt, batches=epochs_from(ctx.start, len(loader), epoch), step=step,
        dataloader=loader,
    )  # fmt: skip


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    folder, bad_rank, bad_step = Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    model, opt, loader, epoch, step = parts(folder, rank)
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id="run", key=KEY, dataloader=loader,
        hang_seconds=None,
    )  # fmt: skip
    state = {"folder": str(folder)}
    guard.checkpoint(folder / f"run-r{rank}-0.pt", data_state=state)
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        xb, yb = next(batches)
        if rank == bad_rank and s == bad_step:
            yb = yb.clone()
            yb[1] = (yb[1] + 1) % 3  # the sabotage: one label of this rank's batch
        loss = step((xb, yb))
        guard.step(loss=loss, batch=(xb, yb))
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"run-r{rank}-{s + 1}.pt", data_state=state)
    guard.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
