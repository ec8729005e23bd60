"""Weights and training flags that differ only while forward and backward run (red team 4,
F8: A14a/b, A16a): right at every step hook, wrong in between.  monitor/checks/transient.py
compares them at each forward with gradients.  Each case draws an edit, a step and a loop
shape (micro-batches, an evaluation pass on EMA weights swapped in for it, under no_grad or
with gradients left on: judged only when backpropagated);
exact mode names the edit at its step, budget mode at the first step its unit is drawn
at or after it; the honest twin stays quiet.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)

# (before forward, after backward): the edit and its undo, both through .data or flags
Edit = Callable[[torch.nn.Module, random.Random], Callable[[], None]]


def _zero(model: torch.nn.Module, rng: random.Random) -> Callable[[], None]:
    p = rng.choice([p for p in model.parameters() if p.dim() > 1])
    keep = p.data.clone()
    p.data.zero_()
    return lambda: p.data.copy_(keep)  # type: ignore[no-any-return]


def _noise(model: torch.nn.Module, rng: random.Random) -> Callable[[], None]:
    kept = [(p, p.data.clone()) for p in model.parameters() if p.dim() > 1]
    for p, _ in kept:
        p.data.add_(0.05 * p.data.abs().mean() * torch.randn_like(p))

    def undo() -> None:
        for p, keep in kept:
            p.data.copy_(keep)

    return undo


def _swap(model: torch.nn.Module, rng: random.Random) -> Callable[[], None]:
    p = rng.choice(list(model.parameters()))
    real = p.data
    p.data = real.clone().mul_(0.5)

    def undo() -> None:
        p.data = real

    return undo


def _eval(model: torch.nn.Module, rng: random.Random) -> Callable[[], None]:
    model.eval()
    return model.train


EDITS: dict[str, Edit] = {"zero": _zero, "noise": _noise, "swap": _swap, "eval": _eval}


def _run(
    shape: dict[str, Any], steps: int, edit: Edit | None, at: int, seed: int
) -> tuple[Any, list[int]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    guard = tgw.watch(
        model,
        opt,
        hang_seconds=None,
        min_stall_seconds=10.0,
        budget=shape["budget"],
        key=shape["key"],
    )
    rng = random.Random(seed)
    drawn = []
    for step in range(steps):
        if guard.schedule is None or "transient" in guard.schedule.runs(step):
            drawn.append(step)
        opt.zero_grad()
        micro = shape["micro"]
        for k in range(micro):
            # an edit of the early micro-batches only (the last one is the honest model)
            undo = (
                edit(model, rng)
                if edit is not None and step == at and k < max(micro - 1, 1)
                else None
            )
            idx = torch.randint(0, len(x), (16,), generator=g)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx]) / micro
            loss.backward()
            if undo is not None:
                undo()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                e.lerp_(p, 0.1)
        guard.step(loss=loss)
        if shape["evaluate"] and step % 3 == 0:  # an evaluation pass on the EMA weights
            kept = [p.detach().clone() for p in model.parameters()]
            model.eval()
            with torch.no_grad():
                for p, e in zip(model.parameters(), ema, strict=True):
                    p.copy_(e)
            # Sloppy but honest: gradients left on for the pass, which nothing backpropagates
            # (was TG1318 + TG1301 before the check judged only backpropagated forwards).
            with torch.set_grad_enabled(shape["evaluate_with_grad"]):
                model(x[:32]).mean()
            with torch.no_grad():
                for p, k2 in zip(model.parameters(), kept, strict=True):
                    p.copy_(k2)
            model.train()
    guard.close()
    return guard, drawn


def _high(guard: Any) -> list[tuple[str, int]]:
    return [(a.rule, a.step) for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("budget", [None, 0.5])
def test_weights_or_flags_changed_only_during_forward_are_caught(budget: float | None) -> None:
    rng = seeded()
    shape = {
        "micro": rng.choice([1, 2, 3]),
        "evaluate": rng.random() < 0.5,
        "evaluate_with_grad": rng.random() < 0.5,
        "budget": budget,
        "key": rng.randbytes(32),
    }
    name = rng.choice(sorted(EDITS) if shape["micro"] > 1 else ["zero", "noise", "swap"])
    seed = rng.randrange(2**31)
    steps = 10 if budget is None else 64
    honest, drawn = _run(shape, steps, None, -1, seed)
    assert _high(honest) == [], _high(honest)
    # budget: a step after the warm-up, drawn for the unit or (as often) left out
    later = [s for s in range(18, steps - 2) if (s in drawn) == (rng.random() < 0.5)]
    at = rng.randrange(3, 8) if budget is None else rng.choice(later or [40])
    print(shape["micro"], name, at, seed, "drawn", at in drawn, drawn)
    guard, drawn = _run(shape, steps, EDITS[name], at, seed)
    found = _high(guard)
    rule = "TG1318" if name == "eval" else "TG1301"
    every = [(a.rule, a.step, a.message[:120]) for a in guard.alerts]
    if budget is None:
        assert (rule, at) in found, every
        return
    if at in drawn:
        assert (rule, at) in found, (every, drawn)
    else:  # a one-off edit at a step left out is not seen (docs/watch.md)
        assert not [f for f in found if f[0] == rule], (found, drawn)
    assert all(step >= at for _, step in found), found
