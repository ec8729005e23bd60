"""A small FSDP2 run (``fully_shard``, gloo, CPU) and its replay entry point, for
tests/test_replay_fsdp.py.

Usage: python -m tests.replay_fsdp WORLD PORT FOLDER RUN:SCENARIO...
The process imports torch once and forks WORLD ranks (tests/fsdp_worker.py's
fork_ranks), which train each RUN in turn in one process group.
SCENARIO: honest | poison:RANK:STEP (that rank negates its labels from STEP on, in
training only: the entry point below is the honest code) | tamper:RANK:STEP (after STEP,
that rank adds 1e-3 to its slice of the first layer's weight, outside the optimizer).
Every rank saves its own shard of the weights and optimizer state through
``guard.checkpoint`` at steps 0, 6, 12.
After the runs, each rank tries checkpoints at step 6 of the first run in fresh models
(every rank's, its own without its layout, its own in an unsharded model) and writes what
happened to FOLDER/restores{RANK}.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import trainguard
from tests.dist_worker import join
from tests.fsdp_worker import fork_ranks
from trainguard.explain.replay import sharded
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from
from trainguard.explain.replay.ledger import ReplayError
from trainguard.monitor import checkpoint as ckpt

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 12, 6, 80, 8  # 5 steps per epoch per rank

torch.set_num_threads(1)


def parts(poison: tuple[int, int] | None = None) -> tuple[Any, ...]:
    torch.manual_seed(0)
    # 13 rows: uneven shards on 2 ranks (7 and 6).
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(13, 1)
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    data = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=7)
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
    tamper = (int(args[0]), int(args[1])) if kind == "tamper" else None
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
        if tamper is not None and rank == tamper[0] and s == tamper[1]:
            with torch.no_grad():  # the sabotage: this rank's slice, outside the optimizer
                next(model.parameters()).to_local().add_(1e-3)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-r{rank}-{s + 1}.pt")
    guard.close()


def restores(folder: Path, run_id: str) -> dict[str, str | None]:
    """Checkpoints at step 6 put into fresh models on this rank: each rank's into the entry's
    model (its own loads, a peer's slices sit elsewhere), its own without its slices'
    layout ("whole") and into a model built without fully_shard ("unsharded").  Each
    refusal's message, by case; None where it loaded."""
    rank = dist.get_rank()
    model, opt, *_ = parts()
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(13, 1)
    )
    own = ckpt.read(folder / f"{run_id}-r{rank}-6.pt")
    cases: dict[str, tuple[Any, Any, ckpt.Checkpoint]] = {
        str(r): (model, opt, ckpt.read(folder / f"{run_id}-r{r}-6.pt"))
        for r in range(dist.get_world_size())
    }
    cases["whole"] = (model, opt, dataclasses.replace(own, shards=None))
    cases["unsharded"] = (plain, torch.optim.AdamW(plain.parameters(), lr=1e-2), own)
    out: dict[str, str | None] = {}
    for case, (m, o, saved) in cases.items():
        try:
            model_state, opt_state = sharded.restorable(m, o, saved)
            m.load_state_dict(model_state)
            o.load_state_dict(opt_state)
            out[case] = None
        except ReplayError as exc:
            out[case] = str(exc)
    return out


def rank_main(rank: int, world: int, port: int, folder: Path, jobs: list[str]) -> None:
    join(rank, world, port)
    for job in jobs:
        run_id, _, scenario = job.partition(":")
        train(folder, run_id, scenario)
        dist.barrier()  # the next run's set-up must not race a peer still closing its guard
    first = jobs[0].partition(":")[0]
    (folder / f"restores{rank}.json").write_text(json.dumps(restores(folder, first)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world, port, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    jobs = sys.argv[4:]
    fork_ranks(world, lambda rank: rank_main(rank, world, port, folder, jobs), folder)


if __name__ == "__main__":
    main()
