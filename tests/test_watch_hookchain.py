"""Gradient hooks installed before watch(), judged by what they do (monitor/hookchain.py).

An honest-user hunt (issue #12): a read-only gradient-logging hook (wandb.watch style:
reads the gradient's norm or histogram, returns None) registered before ``watch`` was
TG1304 high, because what a hook's code is says nothing about what it does.  The guard
now heads each such chain with a witness of its own and checks that ``p.grad`` after
accumulation is what autograd computed: read-only hooks are medium at start, and a
hook that changes the gradient (a flip, a scale, noise, a clamp, an in-place edit, a
write into ``p.grad``) is TG1306 at the first step.  Each case draws the hooks.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)

Hook = Callable[[torch.Tensor], Any]
LOG: list[float] = []


class _Stats:
    """A callable object keeping running statistics (a logger's histogram)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, grad: torch.Tensor) -> None:
        self.seen.append(torch.histc(grad.detach().float(), bins=8))


def _reader(rng: random.Random) -> Hook:
    def norm(grad: torch.Tensor) -> None:
        LOG.append(float(grad.norm()))

    def same(grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()  # an equal tensor: read-only by value

    readers: list[Hook] = [norm, same, _Stats(), lambda g: None]
    return rng.choice(readers)


def _writer(rng: random.Random, p: torch.Tensor) -> Hook:
    def in_place(grad: torch.Tensor) -> None:
        grad.mul_(0.1)

    def noise(grad: torch.Tensor) -> torch.Tensor:
        return grad + torch.randn_like(grad) * (grad.norm() / grad.numel() ** 0.5)  # type: ignore[no-any-return]

    def into_grad(grad: torch.Tensor) -> None:
        # the gradient held before this pass (or, with none held, the incoming one)
        (p.grad if p.grad is not None else grad).add_(1.0)

    def clamp(grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(-1e-6, 1e-6)

    writers: list[Hook] = [
        torch.neg,
        functools.partial(torch.mul, other=0.1),
        in_place,
        noise,
        into_grad,
        clamp,
    ]
    return rng.choice(writers)


def _run(rng: random.Random, writer: bool, budget: float | None) -> tuple[Any, str]:
    torch.manual_seed(rng.randrange(2**31))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    named = list(model.named_parameters())
    hooked = rng.sample(named, rng.randrange(1, len(named) + 1))
    for _, p in hooked:
        for _ in range(rng.randrange(1, 3)):
            p.register_hook(_reader(rng))  # type: ignore[no-untyped-call]
    victim = ""
    if writer:
        victim, p = rng.choice(hooked)
        p.register_hook(_writer(rng, p))  # type: ignore[no-untyped-call]
        if rng.random() < 0.5:
            p.register_hook(_reader(rng))  # type: ignore[no-untyped-call]  # a reader after it sees the changed gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, budget=budget)
    accumulate = rng.choice([1, 2])
    for _ in range(4):
        opt.zero_grad(set_to_none=rng.random() < 0.5)
        for _ in range(accumulate):
            model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        guard.step()
    guard.close()
    return guard, victim


@pytest.mark.parametrize("case", range(3))
def test_read_only_hooks_are_medium_and_a_hook_that_changes_the_gradient_is_tg1306(
    case: int,
) -> None:
    rng = seeded()
    seed = rng.randrange(2**31)
    budget = rng.choice([None, 0.05])
    print(seed, budget)
    guard, _ = _run(random.Random(seed), writer=False, budget=budget)
    high = [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]
    assert high == [], high
    start = [a for a in guard.alerts if a.rule == "TG1304"]
    assert start and all("verified read-only" in a.message for a in start), start
    guard, victim = _run(random.Random(seed), writer=True, budget=None)
    found = [a for a in guard.alerts if a.rule == "TG1306" and "gradient hook" in a.message]
    assert found and found[0].step == 0, guard.alerts
    assert victim in found[0].message, (victim, found[0].message)
