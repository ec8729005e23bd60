"""The gradient between backward and optimizer.step (red team 4, F1: A01, A06, A15a).

The probe used to alert only on a flipped gradient (cosine below -0.5), so a layer's
gradient zeroed, set to None, made sparse, scaled by 0.1, replaced by noise of the
same norm, or clipped to a tighter max_norm all passed.  monitor/gradfactor.py holds
the invariant: at the pre-hook the sampled gradient is ONE factor times what backward
left (a constant clip norm, a loss scale's power of two, a fixed division), or
clip_grad_value_'s clamp with one value.  Each case is drawn at random from the
family (setup x edit x step); the honest twin of every setup stays quiet.
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

Edit = Callable[[torch.nn.Module, random.Random], None]


def _weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.dim() > 1 and p.grad is not None]


def _zero(model: torch.nn.Module, rng: random.Random) -> None:
    p = rng.choice(_weights(model))
    assert p.grad is not None
    p.grad.zero_()


def _none(model: torch.nn.Module, rng: random.Random) -> None:
    rng.choice([p for p in model.parameters() if p.grad is not None]).grad = None


def _sparse_flip(model: torch.nn.Module, rng: random.Random) -> None:
    p = rng.choice(_weights(model))
    assert p.grad is not None
    p.grad = (-p.grad).to_sparse()


def _scale(model: torch.nn.Module, rng: random.Random) -> None:
    factor = rng.choice([0.1, 0.3, 0.05])
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _noise(model: torch.nn.Module, rng: random.Random) -> None:
    p = rng.choice(_weights(model))
    assert p.grad is not None
    noise = torch.randn_like(p.grad)
    p.grad.copy_(noise * (p.grad.norm() / noise.norm()))


def _partial_flip(model: torch.nn.Module, rng: random.Random) -> None:
    p = rng.choice(_weights(model))
    assert p.grad is not None
    mask = torch.rand_like(p.grad) < rng.uniform(0.1, 0.4)
    p.grad[mask] = -p.grad[mask]


def _tighter_clip(model: torch.nn.Module, rng: random.Random) -> None:
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
    torch.nn.utils.clip_grad_norm_(params, float(total) * rng.uniform(0.05, 0.3))


EDITS: dict[str, Edit] = {
    "tighter-clip": _tighter_clip,
    "zero": _zero,
    "none": _none,
    "sparse-flip": _sparse_flip,
    "scale": _scale,
    "noise": _noise,
    "partial-flip": _partial_flip,
}


class _WithUnused(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.unused = torch.nn.Linear(4, 4)  # never called: its gradient stays None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # type: ignore[no-any-return]


def _run(setup: dict[str, Any], steps: int, edit: Edit | None, at: int, seed: int) -> Any:
    torch.manual_seed(seed)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
    )
    if setup["unused"]:
        model = _WithUnused(model)
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if setup["optimizer"] == "sgd"
        else torch.optim.AdamW(params, lr=3e-3)
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0 ** setup["scale"]) if setup["scale"] else None
    )
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, budget=setup["budget"])
    rng = random.Random(seed)
    for step in range(steps):
        opt.zero_grad(set_to_none=setup["set_to_none"])
        for _ in range(setup["accumulate"]):
            idx = torch.randint(0, len(x), (16,), generator=g)
            # A large first batch: the first step clipped, later ones maybe not (the scaler's
            # power of two was once never learnt then: TG1306 at every unclipped step).
            # (Clipped runs only: unclipped, such a step may diverge the run, then the
            # scaler skips steps and the edit with them.)
            big = setup["first_step_scale"] if step == 0 and setup["clip"] == "norm" else 1.0
            out = model(x[idx] * big)
            loss = torch.nn.functional.mse_loss(out, y[idx] * big) / setup["accumulate"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if setup["divide"]:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(3.0)
        if setup["clip"] == "norm":
            torch.nn.utils.clip_grad_norm_(params, setup["max_norm"])
        elif setup["clip"] == "value":
            torch.nn.utils.clip_grad_value_(params, 0.05)
        if edit is not None and step >= at:
            edit(model, rng)
        try:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        except RuntimeError:  # Adam refuses the sparse gradient after the pre-hook saw it
            assert edit is _sparse_flip, edit
            break
        guard.step(loss=loss)
    guard.close()
    return guard


def _setup(rng: random.Random) -> dict[str, Any]:
    return {
        "optimizer": rng.choice(["sgd", "adamw"]),
        "clip": rng.choice(["none", "norm", "value"]),
        "max_norm": rng.choice([0.05, 0.2, 1.0]),
        "scale": rng.choice([0, 0, 8, 16]),
        "divide": rng.random() < 0.25,
        "first_step_scale": rng.choice([1.0, 1.0, 4.0]),
        "accumulate": rng.choice([1, 1, 2]),
        "set_to_none": rng.random() < 0.5,
        "unused": rng.random() < 0.3,
        "budget": None,
    }


def _high(guard: Any) -> list[tuple[str, int, str]]:
    return [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(3))
def test_a_gradient_edited_between_backward_and_the_step_is_caught_at_its_step(case: int) -> None:
    rng = seeded()
    setup = _setup(rng)
    name = rng.choice(sorted(EDITS))
    at = rng.randrange(3, 8)
    seed = rng.randrange(2**31)
    print(setup, name, at, seed)
    honest = _high(_run(setup, at + 2, None, at, seed))
    assert honest == [], honest
    found = _high(_run(setup, at + 2, EDITS[name], at, seed))
    assert any(rule == "TG1306" and step == at for rule, step, _ in found), found
    assert all(step >= at for _, step, _ in found), found


def test_per_tensor_clipping_is_quiet_once_declared_and_a_dropped_gradient_still_is_not() -> None:
    rng = seeded()
    seed = rng.randrange(2**31)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    y = x[:, :1]
    at = rng.randrange(3, 8)
    for declared in (True, False):
        guard = tgw.watch(
            model,
            opt,
            hang_seconds=None,
            min_stall_seconds=10.0,
            grad_clipping="per_tensor" if declared else "global",
        )
        for step in range(at + 1):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for layer in (model[0], model[2]):  # each module clipped on its own
                torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.01)
            if declared and step == at:
                model[0].weight.grad = None
            opt.step()
            guard.step()
        guard.close()
        found = [(r, s) for r, s, _ in _high(guard) if r == "TG1306"]
        if declared:
            assert found == [("TG1306", at)], found
        else:  # undeclared, two clip norms are one factor per subset: not honest clipping
            assert found and found[0][1] <= 1, found


def test_an_unscaled_run_whose_first_step_clips_is_quiet() -> None:
    """GradScaler (or a division by a power of two), then clip_grad_norm_, the first step
    clipped and later ones not (HF Trainer's fp16 default with a large first loss): the
    first factor, 2^-k times the clip, once stood for a fixed division, so the scaler's
    power of two was never learnt and every later unclipped step was TG1306 critical."""
    rng = seeded()
    scaled = rng.random() < 0.5
    exponent = rng.randrange(2, 17)
    max_norm = rng.choice([0.5, 1.0, 2.0])
    print(f"scaler {scaled}, 2^{exponent}, max_norm {max_norm}")
    torch.manual_seed(rng.randrange(2**31))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**exponent, enabled=scaled)
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0)
    for step in range(12):
        x = torch.randn(8, 4) * (10.0 if step == 0 else 0.01)  # the first step clips
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if scaled:
            scaler.unscale_(opt)
        else:
            for p in model.parameters():
                assert p.grad is not None
                p.grad.div_(2.0**exponent)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)
        scaler.update()
        guard.step(loss=loss)
    guard.close()
    assert _high(guard) == []
