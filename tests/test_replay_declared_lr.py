"""A loop that computes its own learning rate and declares it (red team 4, A03a).

nanoGPT's loop sets ``g["lr"] = get_lr(it)`` from module globals (``LR_MAX``) and tells the
guard ``guard.step(lr=lr)``: the in-process monitor trusts the declaration, and code that
rebinds ``LR_MAX = LR_MAX / 20`` changes both the lr and the declaration (docs/watch.md,
"Limits").  The recomputation is what catches it: ``replay`` rebuilds the loop from its
entry point, where the global holds the value the code sets, and the segment from the
change on diverges (the lr and the weights differ).  Generated: the step of the change and
its factor; the honest run matches everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay  # noqa: E402

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH, WARM = 12, 4, 48, 8, 3
LR_MAX = 3e-3  # the global the loop reads, as nanoGPT's learning_rate


def _lr(it: int) -> float:
    if it < WARM:
        return LR_MAX * (it + 1) / WARM
    return LR_MAX * 0.5 * (1 + math.cos(math.pi * (it - WARM) / (STEPS - WARM)))


def parts() -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=LR_MAX)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
        generator=torch.Generator(),
    )  # fmt: skip

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(100 + e)
        return loader

    done = [0]

    def step(batch: Any) -> Any:
        lr = _lr(done[0])
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done[0] += 1
        return loss, lr

    return model, opt, loader, epoch, step, done


def build(ctx: ReplayContext) -> Replayable:
    model, opt, loader, epoch, step, done = parts()
    done[0] = ctx.start

    def replayed(batch: Any) -> Any:
        return step(batch)[0]

    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, batches=batches, step=replayed, dataloader=loader)


def _train(folder: Path, change: tuple[int, float] | None) -> str:
    global LR_MAX
    ledger = str(folder / "ledger.db")
    model, opt, loader, epoch, step, _ = parts()
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id="run", key=KEY, dataloader=loader, hang_seconds=None
    )
    guard.checkpoint(folder / "run-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    original = LR_MAX
    try:
        for s in range(STEPS):
            if change is not None and s == change[0]:
                LR_MAX = LR_MAX * change[1]  # planted code rebinding the loop's global
            loss, lr = step(next(batches))
            guard.step(loss=loss, batch=None, lr=lr)
            if (s + 1) % EVERY == 0:
                guard.checkpoint(folder / f"run-{s + 1}.pt")
    finally:
        LR_MAX = original  # a fresh process (the verifier's) reads the code's value
        guard.close()
    return ledger


def test_a_declared_lr_computed_from_a_rebound_global_diverges_in_replay(tmp_path: Path) -> None:
    rng = seeded()
    at, factor = rng.randrange(1, STEPS - 1), rng.choice([0.05, 0.5, 2.0])
    print("change at", at, "factor", factor)
    (tmp_path / "h").mkdir()
    honest = replay(_train(tmp_path / "h", None), "run", build, key=KEY, all_segments=True)
    assert honest.verdict == "matched", honest.findings()
    (tmp_path / "a").mkdir()
    report = replay(_train(tmp_path / "a", (at, factor)), "run", build, key=KEY, all_segments=True)
    first = report.first_divergence
    assert first is not None, report.findings()
    assert first.step == at, (at, first)
