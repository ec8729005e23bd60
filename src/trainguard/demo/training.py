"""The demo's training run: the user's code, the incident's sabotage, and the replay entry.

A small regression model trains for :data:`STEPS` steps under
:func:`trainguard.watch`, with a checkpoint every :data:`CHECKPOINT_EVERY` steps.
Sabotage is the incident's, done with plain Python in this process (no payload
file): from step :data:`PATCH_STEP` on, code "planted" in the job patches
gradient clipping to flip the gradient and the optimizer step to sleep at
random, but only when the job is large (the demo says it is); at
:data:`EDIT_STEP` it also edits a weight between two steps.  :func:`build` is
the entry point ``trainguard replay`` calls: the same training code, honest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = 60
CHECKPOINT_EVERY = 10
PATCH_STEP = 25  # the payload arms itself after this many steps (the attacker adapting)
EDIT_STEP = 42  # a weight is edited after this many steps
JOB_GPUS = 256  # the size the payload waits for; the demo's job claims it
SAMPLES, BATCH = 240, 16


def parts() -> tuple[Any, Any, Any, Any, Callable[[int], Any], Callable[[Any], Any]]:
    """Model, optimizer, scheduler, loader, epoch(e) -> loader, step(batch) -> loss."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator(),
    )

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(1000 + e)  # each epoch's order follows from its number
        return loader

    def step(batch: Any) -> Any:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        return loss

    return model, optimizer, scheduler, loader, epoch, step


def build(ctx: Any) -> Any:
    """``trainguard replay --entry trainguard.demo.training:build``: fresh, honest objects."""
    from trainguard.explain.replay.engine import Replayable, epochs_from

    model, optimizer, scheduler, loader, epoch, step = parts()
    return Replayable(
        model, optimizer, scheduler=scheduler, batches=epochs_from(ctx.start, len(loader), epoch),
        step=step,
    )  # fmt: skip


def plant_payload(optimizer: Any, job_gpus: int) -> Callable[[], None]:
    """What the planted code did in the incident, harmlessly: returns an undo.

    Only on jobs of 256+ GPUs (small debugging jobs stay clean): clipping
    returns the norm but flips every gradient, and the optimizer step sleeps
    now and then.  Clipping is patched on torch itself; the step on the
    running optimizer (an LR scheduler already wraps the instance's ``step``,
    so a patch of the class alone would not take effect mid-run).
    """
    import torch

    if job_gpus < JOB_GPUS:
        return lambda: None
    original_clip = torch.nn.utils.clip_grad_norm_
    original_step = optimizer.step
    rng = random.Random(5)  # noqa: S311 - a saboteur's jitter, not a secret

    def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        params = [p for p in parameters if p.grad is not None]
        norm = original_clip(params, max_norm, *args, **kwargs)
        for p in params:
            p.grad.neg_()  # "clipping" that points the update the wrong way
        return norm

    def step(*args: Any, **kwargs: Any) -> Any:
        if rng.random() < 0.12:
            time.sleep(0.4)  # the random stalls that made the job look flaky
        return original_step(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    optimizer.step = step

    def undo() -> None:
        torch.nn.utils.clip_grad_norm_ = original_clip
        optimizer.step = original_step

    return undo


def train(folder: Path, ledger: str, run_id: str, key: bytes) -> list[Any]:
    """Train under the guard, sabotaged from PATCH_STEP; return the guard's alerts."""
    import torch

    import trainguard
    from trainguard.explain.replay.engine import epochs_from

    torch.set_num_threads(1)  # tiny model: one thread is fastest, and replay matches it
    folder.mkdir(parents=True, exist_ok=True)
    model, optimizer, scheduler, loader, epoch, step = parts()
    guard = trainguard.watch(
        model, optimizer, ledger=ledger, run_id=run_id, scheduler=scheduler, key=key,
        dataloader=loader, min_stall_seconds=0.25,
    )  # fmt: skip
    undo: Callable[[], None] = lambda: None  # noqa: E731
    try:
        guard.checkpoint(folder / "ckpt-0.pt", data_state={"epoch": 0})
        batches = epochs_from(0, len(loader), epoch)
        for n in range(STEPS):
            if n == PATCH_STEP:
                undo = plant_payload(optimizer, JOB_GPUS)
            loss = step(batch := next(batches))
            guard.step(loss=loss, batch=batch)
            if n + 1 == EDIT_STEP:
                with torch.no_grad():  # the weight edit, between two steps
                    model[3].weight[0, :4].mul_(-1.0)
            if (n + 1) % CHECKPOINT_EVERY == 0:
                guard.checkpoint(
                    folder / f"ckpt-{n + 1}.pt", data_state={"epoch": (n + 1) // len(loader)}
                )
    finally:
        undo()
        guard.close()
    return list(guard.alerts)
