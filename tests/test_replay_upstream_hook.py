"""A gradient made wrong inside backward, where the in-process guard cannot look, diverges
in replay (issue #12, red team s5 family 1).

Hooks put on a tensor or an autograd node *during* a step live on nodes made in forward
and gone after backward; torch lists no node's hooks.  The guard holds what it can (the
criterion's registries, the model's autograd Functions, the model output's gradient:
monitor/upstream.py, checks/outputgrad.py); a hook on a tensor inside the model, or a
post-hook on the output's node, is out of its reach (docs/watch.md).  The recomputation is
what catches it: ``replay`` rebuilds the loop from its entry point, where no such hook is
put, and the segment from the hook's first step diverges.  Generated: the hook's kind
(a tensor hook on a hidden activation, a post-hook on the output's node rewriting what
flows into the model, a pre-hook on a hidden node), its first step and its factor; the
honest run matches everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay  # noqa: E402

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 12, 4, 48, 8


def parts(plant: Any = None) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
        generator=torch.Generator(),
    )  # fmt: skip

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(100 + e)
        return loader

    done = [0]

    def step(batch: Any) -> Any:
        hidden = model[1](model[0](batch[0]))
        out = model[2](hidden)
        if plant is not None:
            plant(done[0], hidden, out)
        loss = torch.nn.functional.cross_entropy(out, batch[1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done[0] += 1
        return loss

    return model, opt, loader, epoch, step, done


def build(ctx: ReplayContext) -> Replayable:
    model, opt, loader, epoch, step, done = parts()
    done[0] = ctx.start
    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, batches=batches, step=step, dataloader=loader)


def planter(kind: str, at: int, factor: float) -> Any:
    def plant(s: int, hidden: Any, out: Any) -> None:
        if s < at:
            return
        if kind == "hidden-tensor":
            hidden.register_hook(lambda g: g * factor)
        elif kind == "output-node-post":
            out.grad_fn.register_hook(
                lambda gi, go: tuple(g * factor if g is not None else g for g in gi)
            )
        else:
            hidden.grad_fn.register_prehook(lambda go: (go[0] * factor,))

    return plant


def _train(folder: Path, plant: Any) -> str:
    ledger = str(folder / "ledger.db")
    model, opt, loader, epoch, step, _ = parts(plant)
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id="run", key=KEY, dataloader=loader, hang_seconds=None
    )
    guard.checkpoint(folder / "run-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    try:
        for s in range(STEPS):
            loss = step(next(batches))
            guard.step(loss=loss, batch=None)
            if (s + 1) % EVERY == 0:
                guard.checkpoint(folder / f"run-{s + 1}.pt")
    finally:
        guard.close()
    return ledger


def test_a_hook_inside_backward_out_of_the_guards_reach_diverges_in_replay(tmp_path: Path) -> None:
    rng = seeded()
    kind = rng.choice(["hidden-tensor", "output-node-post", "hidden-node-pre"])
    at, factor = rng.randrange(1, STEPS - 1), rng.choice([-1.0, 0.0, 4.0])
    print("hook", kind, "from step", at, "factor", factor)
    (tmp_path / "h").mkdir()
    honest = replay(_train(tmp_path / "h", None), "run", build, key=KEY, all_segments=True)
    assert honest.verdict == "matched", honest.findings()
    (tmp_path / "a").mkdir()
    ledger = _train(tmp_path / "a", planter(kind, at, factor))
    report = replay(ledger, "run", build, key=KEY, all_segments=True)
    first = report.first_divergence
    assert first is not None, report.findings()
    assert first.step == at, (at, first)
