"""Schedules that anneal to a tiny learning rate: the update's size is judged only where
the step is many float spacings of the weight (monitor/direction.py ROUNDING_SPACINGS).

Red team s5 (/work/tmp/s5/red_report.md, honest false alarms; honest_lightning.py):
Lightning + AdamW + OneCycleLR(total_steps=40), max_steps=40: TG1306 critical at the last
step, "the update is 0.737 times the size the learning rate gives" at lr ~1.2e-8, where
every float32 weight's change is its rounding.  Generated: optimizers x schedules ending
at a tiny (or zero) lr, float32 and bfloat16 weights, honest: no TG1306; the same runs
with the update scaled or flipped at a normal lr: TG1306 high or critical at that step.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

STEPS = 12

OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
    "nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.05),
    "amsgrad": lambda p, lr: torch.optim.AdamW(p, lr=lr, amsgrad=True),
}


def _schedule(name: str, opt: Any, floor: float) -> Any:
    sched = torch.optim.lr_scheduler
    if name == "onecycle":
        max_lr = opt.param_groups[0]["lr"]
        cyc = "betas" in opt.defaults or bool(opt.defaults.get("momentum"))
        return sched.OneCycleLR(opt, max_lr=max_lr, total_steps=STEPS, cycle_momentum=cyc)
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=STEPS - 1, eta_min=floor)
    # linear decay to (almost) zero
    return sched.LambdaLR(opt, lambda s: max(floor, 1.0 - s / (STEPS - 1)))


def _scale_update(at: int, factor: float) -> Any:
    """A step pre/post hook pair, registered before watch(), scaling the update at ``at``."""
    seen = {"n": 0}
    before: dict[int, Any] = {}

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        before.clear()
        before.update({id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]})

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        seen["n"] += 1
        if seen["n"] - 1 != at:
            return
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    old = before[id(p)]
                    p.copy_(old + factor * (p - old))

    return pre, post


def _run(rng: random.Random, attack: tuple[int, float] | None) -> tuple[Any, tuple[Any, ...]]:
    name = rng.choice(sorted(OPTIMIZERS))
    schedule = rng.choice(["onecycle", "cosine", "linear"])
    dtype = rng.choice([torch.float32, torch.bfloat16]) if attack is None else torch.float32
    floor = rng.choice([0.0, 1e-9, 1e-7])
    base_lr = 3e-3 if name.startswith("ad") else 0.05
    torch.manual_seed(rng.randrange(1000))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    model = model.to(dtype)
    opt = OPTIMIZERS[name](list(model.parameters()), base_lr)
    sched = _schedule(schedule, opt, floor)
    if attack is not None:
        pre, post = _scale_update(*attack)
        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, scheduler=sched)
    x = torch.randn(64, 16, dtype=dtype)
    y = torch.randint(0, 4, (64,))
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        guard.step(loss=loss, batch=x)
    guard.close()
    return guard, (name, schedule, str(dtype), floor, attack, sched.get_last_lr())


def test_honest_schedules_annealing_to_a_tiny_lr_are_quiet() -> None:
    rng = seeded()
    for _ in range(3):
        guard, case = _run(rng, None)
        found = [(a.rule, a.step, a.message[:90]) for a in guard.alerts if a.rule == "TG1306"]
        assert not found, (case, found)


def test_a_scaled_or_flipped_update_at_a_normal_lr_is_still_caught() -> None:
    rng = seeded()
    for _ in range(2):
        at = rng.randrange(2, STEPS // 2)  # the schedule's lr is far from its floor there
        factor = rng.choice([0.7, -1.0, rng.uniform(0.3, 0.75), rng.uniform(1.4, 3.0)])
        guard, case = _run(rng, (at, factor))
        found = [a for a in guard.alerts if a.rule == "TG1306" and a.step == at]
        assert found and all(a.severity >= Severity.HIGH for a in found), (
            case,
            [(a.rule, a.step, a.message[:90]) for a in guard.alerts],
        )
        assert math.isfinite(factor)
