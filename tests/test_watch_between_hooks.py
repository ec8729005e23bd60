"""A patch present only while forward and backward run (issue #12, red team 4 A18).

``torch.relu`` replaced when the loader collated the batch and put back after backward,
every step: every route check compared at the optimizer's hooks and at ``guard.step``,
where the original was always back.  The surface check now also compares its hot names
at the start of each forward with gradients, when backward reaches the forward's output
and when that backward ends (checks/surface.py).  Generated: a name the step calls
(``torch.relu``, ``torch.tanh``, ``F.linear``, ``F.mse_loss``), replaced for a window
(forward and backward, forward only, backward only), from a random step on, exact or
budget mode; honest twins (accumulation, an evaluation pass with gradients on,
activation checkpointing) are quiet and the patched run is TG1304 critical at the first
patched step whose surface unit ran.  The loop patches by hand: how code gets to run
there (a collate map, an engine proxy) is other checks' business.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)
F = torch.nn.functional

TARGETS: list[tuple[Any, str]] = [
    (torch, "relu"),
    (torch, "tanh"),
    (F, "linear"),
    (F, "mse_loss"),
]


class Net(torch.nn.Module):
    def __init__(self, ckpt: bool) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 1)
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        if self.ckpt:
            h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=False)
        else:
            h = torch.tanh(self.b(h))
        out: torch.Tensor = self.c(h)
        return out


def _wrap(real: Any) -> Any:
    def patched(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs) * 0.5

    return patched


def _run(setup: dict[str, Any], steps: int, attack: dict[str, Any] | None, seed: int) -> Any:
    torch.manual_seed(seed)
    model = Net(setup["ckpt"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, budget=setup["budget"])
    where, name = TARGETS[attack["target"]] if attack is not None else (torch, "relu")
    real = getattr(where, name)
    window = attack["window"] if attack is not None else ""
    patched: list[int] = []
    try:
        for step in range(steps):
            on = attack is not None and step >= attack["at"]
            opt.zero_grad()
            for _ in range(setup["accumulate"]):
                idx = torch.randint(0, len(x), (16,), generator=g)
                if on and window in ("both", "forward"):
                    setattr(where, name, _wrap(real))
                out = model(x[idx])
                if on and window == "forward":
                    setattr(where, name, real)
                if on and window == "backward":
                    setattr(where, name, _wrap(real))
                loss = F.mse_loss(out, y[idx]) / setup["accumulate"]
                loss.backward()
                setattr(where, name, real)
            opt.step()
            runs = guard._runs
            if on and (runs is None or "surface" in runs):
                patched.append(step)
            if setup["evaluate"] and step % 2 == 1:
                model.eval()
                model(x[:32])  # gradients on, no backward
                model.train()
            guard.step(loss=loss)
    finally:
        setattr(where, name, real)
        guard.close()
    return guard, patched


def _high(guard: Any) -> list[tuple[str, int, str]]:
    return [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(3))
def test_a_patch_present_only_during_forward_or_backward_is_caught_at_its_step(
    case: int,
) -> None:
    rng = seeded()
    setup = {
        "accumulate": rng.choice([1, 1, 2]),
        "ckpt": rng.random() < 0.3,
        "evaluate": rng.random() < 0.4,
        "budget": rng.choice([None, None, 0.02]),
    }
    at = rng.randrange(3, 8)  # the hot names are learned in the second step
    attack: dict[str, Any] = {
        "target": rng.randrange(len(TARGETS)),
        "window": rng.choice(["both", "forward", "backward"]),
        "at": at,
    }
    seed = rng.randrange(2**31)
    print(setup, attack, seed)
    honest, _ = _run(setup, at + 4, None, seed)
    assert _high(honest) == [], _high(honest)
    guard, patched = _run(setup, at + 4, attack, seed)
    found = _high(guard)
    assert all(step >= at for _, step, _ in found), found
    if patched:
        first = [(r, s) for r, s, _ in found if s == patched[0]]
        assert ("TG1304", patched[0]) in first, (patched, found)
