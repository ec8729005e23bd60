"""A small run over sealed data for tests/test_data_replay.py, and its honest entry point.

``train(folder, sabotage, at)`` seals a random dataset (``make_dataset``), trains on it
through a ``SealedDataset`` under a guard and returns the indices the seed's order put
in the batch of step ``at``.  ``sabotage`` (training only) changes the batch of step
``at``: relabel | poison | swap | duplicate | replace, or reseed (the sampler is seeded
otherwise from the first epoch that starts at or after ``at``), or none.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

import trainguard
from trainguard.data.seal import seal_dataset
from trainguard.data.sealed import SealedDataset
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from
from trainguard.signing.keys import write_keypair

KEY = bytes(range(32))
BATCH, EVERY = 8, 4
SABOTAGES = ("relabel", "poison", "swap", "duplicate", "replace", "reseed")


def make_dataset(folder: Path, rnd: random.Random) -> tuple[Path, Path, int]:
    """1-3 torch.save shards of (x, y); sealed; returns the data folder, the public key and
    the sample count."""
    data = folder / "data"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(rnd.randrange(2**31))
    total = 0
    shards = rnd.randint(1, 3)
    for k in range(shards):
        n = rnd.randint(10, 24)
        if k == shards - 1 and (total + n) % BATCH == 1:
            n += 1  # no one-sample last batch: swap and duplicate need two rows
        x = torch.randn(n, 4, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        torch.save((x, y), data / f"part-{k}.pt")
        total += n
    private, public = write_keypair(folder / "signer")
    seal_dataset([data], private)
    return data, public, total


def steps_per_epoch(samples: int) -> int:
    return -(-samples // BATCH)


def parts(
    data: Path, public: Path, rank: int = 0, reseed_from: int | None = None, workers: int = 0
) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset: Any = SealedDataset(data, public, rank=rank)  # a map-style dataset for torch
    loader: Any = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator(), num_workers=workers
    )

    def epoch(e: int) -> Any:
        sabotaged = reseed_from is not None and e >= reseed_from
        loader.generator.manual_seed((666 if sabotaged else 1000) + e)
        return loader

    def step(batch: Any) -> Any:
        xb, yb = batch
        loss: Any = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, loader, epoch, step


def build_for(data: Path, public: Path, workers: int = 0) -> Any:
    def build(ctx: ReplayContext) -> Replayable:
        model, opt, loader, epoch, step = parts(data, public, ctx.rank, workers=workers)
        return Replayable(
            model, opt, batches=epochs_from(ctx.start, len(loader), epoch), step=step,
            dataloader=loader,
        )  # fmt: skip

    return build


def _sabotage(kind: str, batch: Any, dataset: Any, rnd: random.Random, chosen: list[int]) -> Any:
    xb, yb = batch[0].clone(), batch[1].clone()
    n = xb.shape[0]
    j, k = rnd.sample(range(n), 2)
    if kind == "relabel":
        yb[j] = (yb[j] + rnd.randint(1, 2)) % 3
    elif kind == "poison":
        xb[j, rnd.randrange(4)] += 0.5
    elif kind == "swap":
        xb[[j, k]], yb[[j, k]] = xb[[k, j]], yb[[k, j]]
    elif kind == "duplicate":
        xb[j], yb[j] = xb[k], yb[k]
    elif kind == "replace":
        outside = [i for i in range(len(dataset)) if i not in chosen]
        other = dataset[rnd.choice(outside)]
        xb[j], yb[j] = other[0], other[1]
    return xb, yb


def train(
    folder: Path,
    data: Path,
    public: Path,
    steps: int,
    sabotage: str,
    at: int,
    rnd: random.Random,
    pass_batch: bool = True,
    workers: int = 0,
) -> list[list[int]]:
    """Train ``steps`` steps; returns, per step, the indices the seed's order put in its
    batch.  ``pass_batch=False``: the loop passes no batch to ``guard.step``; ``workers``:
    the loader's worker processes."""
    per_epoch = steps_per_epoch(len(SealedDataset(data, public)))
    reseed_from = -(-at // per_epoch) if sabotage == "reseed" else None
    model, opt, loader, epoch, step = parts(data, public, 0, reseed_from, workers)
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id="run", key=KEY, dataloader=loader,
        hang_seconds=None,
    )  # fmt: skip
    guard.checkpoint(folder / "run-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    fed: list[list[int]] = []
    assert guard.samples is not None and guard.samples.log is not None
    for s in range(steps):
        batch = next(batches)
        fed.append(list(guard.samples.log.current() or []))
        if s == at and sabotage not in ("none", "reseed"):
            batch = _sabotage(sabotage, batch, loader.dataset, rnd, fed[-1])
        loss = step(batch)
        guard.step(loss=loss, batch=batch if pass_batch else None)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"run-{s + 1}.pt")
    guard.close()
    return fed
