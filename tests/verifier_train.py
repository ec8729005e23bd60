"""A small training run for tests/test_verifier.py, and its honest replay entry point.

Usage: python -m tests.verifier_train FOLDER RUN SABOTAGE START
SABOTAGE (from step START on, in training only): labels | lr | grads | reseed | none.
Before closing, the run waits (up to WAIT_S) for the verifier's first verdict that is
not "matched", so the verifier is shown to catch it while training still goes on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

import trainguard
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 40, 5, 64, 8  # 8 steps per epoch
WAIT_S = 300.0  # generous: returns as soon as the verdict is in

torch.set_num_threads(1)


def parts() -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.8)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
        generator=torch.Generator(),
    )  # fmt: skip

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(1000 + e)
        return loader

    return model, opt, sched, loader, epoch


def make_step(model: Any, opt: Any, sched: Any, sabotage: str = "none", start: int = 0) -> Any:
    done = [0]

    def step(batch: Any) -> Any:
        xb, yb = batch
        active = sabotage != "none" and done[0] >= start
        if active and sabotage == "labels":
            yb = yb.flip(0)  # labels shuffled within the batch
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if active and sabotage == "grads":
            for p in model.parameters():
                p.grad.mul_(1.001)
        if active and sabotage == "lr":
            opt.param_groups[0]["lr"] *= 1.01
        opt.step()
        sched.step()
        done[0] += 1
        return loss

    return step


def build(ctx: ReplayContext) -> Replayable:
    model, opt, sched, loader, epoch = parts()
    return Replayable(
        model, opt, scheduler=sched, batches=epochs_from(ctx.start, len(loader), epoch),
        step=make_step(model, opt, sched), dataloader=loader,
    )  # fmt: skip


def _flagged(ledger: Any, run_id: str) -> bool:
    return any(
        r.kind == "verdict" and r.payload.get("status") != "matched"
        for r in ledger.records(run_id + "/verify")
    )


def main() -> None:
    folder, run_id, sabotage, start = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    model, opt, sched, loader, epoch = parts()
    step = make_step(model, opt, sched, sabotage, start)
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id=run_id, scheduler=sched, key=KEY,
        dataloader=loader, hang_seconds=None,
    )  # fmt: skip
    guard.checkpoint(folder / f"{run_id}-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        loss = step(next(batches))
        guard.step(loss=loss, batch=None)
        if sabotage == "reseed" and s == start:
            torch.manual_seed(99)  # carried by the next checkpoint; the steps match from it
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-{s + 1}.pt")
    began = time.monotonic()
    while sabotage != "none" and not _flagged(guard.ledger, run_id):
        if time.monotonic() - began > WAIT_S:
            break
        time.sleep(0.2)
    guard.close()


if __name__ == "__main__":
    main()
