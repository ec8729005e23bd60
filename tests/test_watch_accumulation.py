"""Gradient accumulation: the step's gradient is the sum of its backward passes (issue #12).

Red team 4 (A16b): with four micro-batches per step, the accumulated gradient zeroed
after the second one dropped half of every batch from training, and nothing alerted:
the probe compared the step's gradient with what the LAST backward left, which was
consistent.  monitor/accumulation.py reads each pass's contribution where autograd
hands it to the parameter and holds the step's gradient to one factor of their sum.
Generated: an honest setup (2 to 6 micro-batches, SGD or AdamW, the loss divided by the
count or not, zero_grad to None or to zeros, GradScaler, clipping by norm or by value
after the accumulation, activation checkpointing reentrant or not, a branch only some
micro-batches use, an evaluation pass with gradients on, an adversarial-example
backward inside guard.outside_step(), exact or budget mode) stays quiet; the same run
with one edit of the accumulated gradient between two passes (zeroed, set to None,
scaled, the last micro-batch dropped, noise planted before the first pass), at a random
pass and step, is TG1306 at high or above at the first attacked step whose probe ran.
The edit is made by the loop itself: the route code would take to run it (a hook, a
patched engine) is other checks' business; this is the invariant's test.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)

Edit = Callable[[list[torch.nn.Parameter], dict[int, torch.Tensor], random.Random], None]


class Net(torch.nn.Module):
    def __init__(self, ckpt: str) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 1)
        self.other = torch.nn.Linear(32, 1)  # a branch only odd micro-batches use
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor, branch: bool = False) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        if self.ckpt == "none":
            h = torch.tanh(self.mid(h))
        else:
            reentrant = self.ckpt == "reentrant"
            h = checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=reentrant)
        out: torch.Tensor = self.head(h)
        return out + self.other(h) if branch else out


def _with_grad(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.grad is not None]


def _zero(params: list[torch.nn.Parameter], _: dict[int, torch.Tensor], rng: random.Random) -> None:
    for p in _with_grad(params):
        assert p.grad is not None
        p.grad.zero_()


def _none(params: list[torch.nn.Parameter], _: dict[int, torch.Tensor], rng: random.Random) -> None:
    victims = _with_grad(params)
    for p in rng.sample(victims, rng.randint(1, len(victims))):
        p.grad = None


def _scale(
    params: list[torch.nn.Parameter], _: dict[int, torch.Tensor], rng: random.Random
) -> None:
    factor = rng.choice([0.0, 0.1, 0.5, 2.0])
    for p in _with_grad(params):
        assert p.grad is not None
        p.grad.mul_(factor)


def _drop_last(
    params: list[torch.nn.Parameter], before: dict[int, torch.Tensor], rng: random.Random
) -> None:
    """Put back what the gradient was before the last micro-batch's backward."""
    for p in _with_grad(params):
        assert p.grad is not None
        if id(p) in before:
            p.grad.copy_(before[id(p)])
        else:
            p.grad = None


EDITS: dict[str, Edit] = {"zero": _zero, "none": _none, "scale": _scale, "drop": _drop_last}


def _plant(params: list[torch.nn.Parameter], rng: random.Random) -> None:
    """Noise where zero_grad left nothing: the step's gradient is biased by it."""
    for p in params:
        noise = torch.randn_like(p) * rng.choice([0.01, 0.1])
        if p.grad is None:
            p.grad = noise
        else:
            p.grad.add_(noise)


def _setup(rng: random.Random) -> dict[str, Any]:
    return {
        "accumulate": rng.choice([2, 3, 4, 6]),
        "optimizer": rng.choice(["sgd", "adamw"]),
        "divide": rng.random() < 0.7,
        "set_to_none": rng.random() < 0.5,
        "scale": rng.choice([0, 0, 8]),
        "clip": rng.choice(["none", "norm", "value"]),
        "ckpt": rng.choice(["none", "none", "reentrant", "plain"]),
        "branch": rng.random() < 0.3,
        "evaluate": rng.random() < 0.3,  # an evaluation pass with gradients on
        "adversarial": rng.random() < 0.3,  # an input-gradient pass inside outside_step()
        "budget": rng.choice([None, None, 0.02]),
    }


def _run(setup: dict[str, Any], steps: int, attack: dict[str, Any] | None, seed: int) -> Any:
    """The guard, and the attacked steps whose gradient probe ran."""
    torch.manual_seed(seed)
    model = Net(setup["ckpt"])
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if setup["optimizer"] == "sgd"
        else torch.optim.AdamW(params, lr=3e-3)
    )
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0 ** setup["scale"]) if setup["scale"] else None
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, budget=setup["budget"])
    rng = random.Random(seed)
    k = setup["accumulate"]
    probed: list[int] = []
    for step in range(steps):
        opt.zero_grad(set_to_none=setup["set_to_none"])
        if setup["adversarial"]:
            with guard.outside_step("adversarial example"):
                xa = x[:16].clone().requires_grad_(True)
                adversarial = torch.nn.functional.mse_loss(model(xa), y[:16])
                adversarial.backward()  # type: ignore[no-untyped-call]
                opt.zero_grad(set_to_none=setup["set_to_none"])
        edit, between = (attack["edit"], attack["pass"]) if attack is not None else ("", -1)
        attacked = attack is not None and step >= attack["at"]
        if attacked and edit == "plant":
            _plant(params, rng)
        for j in range(k):
            idx = torch.randint(0, len(x), (16,), generator=g)
            before = {id(p): p.grad.clone() for p in params if p.grad is not None}
            out = model(x[idx], branch=setup["branch"] and j % 2 == 1)
            loss = torch.nn.functional.mse_loss(out, y[idx])
            loss = loss / k if setup["divide"] else loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if attacked and edit != "plant" and j == between:
                EDITS[edit](params, before, rng)
        if scaler is not None:
            scaler.unscale_(opt)
        if setup["clip"] == "norm":
            torch.nn.utils.clip_grad_norm_(params, 0.5)
        elif setup["clip"] == "value":
            torch.nn.utils.clip_grad_value_(params, 0.05)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        runs = guard._runs
        if attacked and (runs is None or "direction" in runs):
            probed.append(step)
        if setup["evaluate"] and step % 3 == 2:
            model.eval()
            model(x[:32]).sum()  # gradients on, never backpropagated
            model.train()
        guard.step(loss=loss)
    guard.close()
    return guard, probed


def _high(guard: Any) -> list[tuple[str, int, str]]:
    return [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(4))
def test_an_accumulated_gradient_edited_between_passes_is_caught_and_honest_runs_are_quiet(
    case: int,
) -> None:
    rng = seeded()
    setup = _setup(rng)
    edit = rng.choice([*sorted(EDITS), "plant"])
    at = rng.randrange(2, 8)
    attack: dict[str, Any] = {
        "edit": edit,
        "pass": rng.randrange(setup["accumulate"] - 1),
        "at": at,
    }
    steps = at + 4
    seed = rng.randrange(2**31)
    print(setup, attack, seed)
    honest, _ = _run(setup, steps, None, seed)
    assert _high(honest) == [], _high(honest)
    guard, probed = _run(setup, steps, attack, seed)
    found = _high(guard)
    assert all(step >= at for _, step, _ in found), found
    if probed:  # budget mode: the first attacked step whose probe the schedule drew
        assert any(r == "TG1306" and s == probed[0] for r, s, _ in found), (probed, found)
