"""The scheduler's functions and its step count (TG1303; checks/scheduler.py).

Red team 4 A02: the guard's copy of the scheduler shares LambdaLR's function (a deep
copy keeps functions) and catches up to the real ``last_epoch``, so a global the lambda
reads rebound with the param groups' rate set to match (A02a'), or extra
``scheduler.step()`` calls once or at every step (A02c/d), changed the rate unseen.

Generated: the schedule's function (a lambda over a module global, a closure, a
``functools.partial`` with keywords, a callable object, or a StepLR with no function), how
often the loop steps the scheduler (once per optimizer step, once per micro-batch with
gradient accumulation, once per "epoch"), exact or budget mode, and the attack at a random
step: extra scheduler steps (once, a random count, or one more at every step from then
on), or the function's global, cell, keyword or attribute changed, or the function
replaced, each with the param groups' rate written to what the changed schedule gives.
TG1303 high at that step; the honest twin, and a loop declaring the same change
(``guard.step(changed=["scheduler"])``), are silent.  Seed printed; rerun one with
TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

nn = torch.nn
S = torch.optim.lr_scheduler
STEPS = 20
WARM = 10  # read by the "global" schedule's lambda


def _warm(s: int, *, warm: int) -> float:
    return min(1.0, (s + 1) / warm)


class Warm:
    def __init__(self) -> None:
        self.warm = 10

    def __call__(self, s: int) -> float:
        return min(1.0, (s + 1) / self.warm)


def schedule(kind: str, opt: Any) -> tuple[Any, Any]:
    """The scheduler, and how an attacker changes its function (None: it has none)."""
    if kind == "global":
        return S.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARM)), _rebind
    if kind == "closure":
        warm = 10
        sched = S.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return sched, lambda sc: _cell(sc, 0, 400)
    if kind == "partial":
        return S.LambdaLR(opt, functools.partial(_warm, warm=10)), _keyword
    if kind == "object":
        return S.LambdaLR(opt, Warm()), lambda sc: setattr(sc.lr_lambdas[0], "warm", 400)
    return S.StepLR(opt, step_size=4, gamma=0.5), None


def _rebind(sched: Any) -> None:
    global WARM
    WARM = 400


def _cell(sched: Any, i: int, value: Any) -> None:
    sched.lr_lambdas[0].__closure__[i].cell_contents = value


def _keyword(sched: Any) -> None:
    sched.lr_lambdas[0].keywords["warm"] = 400


def _replace(sched: Any) -> None:
    sched.lr_lambdas[0] = lambda s: 0.02


def _match(sched: Any, opt: Any) -> None:
    """The param groups set to what the changed schedule gives now (red team A02a')."""
    for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        g["lr"] = base * f(sched.last_epoch)


def run(
    rng: random.Random, attack: tuple[str, int] | None, declare: bool = False
) -> tuple[Any, str]:
    """The guard, and how often the loop stepped the scheduler."""
    global WARM
    WARM = 10
    kind = rng.choice(["global", "closure", "partial", "object", "step"])
    cadence = rng.choice(["step", "accum", "epoch"])
    budget = rng.choice([None, None, 0.05])
    torch.manual_seed(rng.randrange(2**31))
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched, change = schedule(kind, opt)
    guard = trainguard.watch(model, opt, hang_seconds=None, scheduler=sched, budget=budget)
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    micro = 3 if cadence == "accum" else 1
    for step in range(STEPS):
        said: Any = None
        lr: Any = None
        if attack is not None and step == attack[1]:
            how = attack[0]
            if how == "function" and change is None:
                how = "extra"  # StepLR holds no function
            if how == "extra":
                # A per-epoch scheduler stepped once more off its epoch boundary is one step
                # in one optimizer step, from a place the loop never steps it from, off its
                # period (monitor/schedcalls.py): told apart since issue #12.
                for _ in range(rng.randrange(1, 30)):
                    sched.step()
            elif how == "function":
                (change if rng.random() < 0.8 else _replace)(sched)
                _match(sched, opt)
            said = ["scheduler"] if declare else None
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (nn.functional.mse_loss(model(xs), ys) / micro).backward()
            if cadence == "accum":
                sched.step()  # once per micro-batch: k per optimizer step
        if said:
            lr = [g["lr"] for g in opt.param_groups]  # what this step runs with
        opt.step()
        if cadence == "step" or (cadence == "epoch" and step % 4 == 3):
            sched.step()
        if attack is not None and attack[0] == "every" and step >= attack[1]:
            sched.step()  # one more every step (A02d)
        guard.step(loss=None, changed=said, lr=lr if said else None)  # it set them too
    guard.close()
    print(kind, cadence, budget, attack, declare)
    return guard, cadence


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


# The micro-batch cadence steps the scheduler before the first optimizer step (torch warns).
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_extra_scheduler_steps_or_a_changed_schedule_function_are_high_at_their_step() -> None:
    rng = seeded()
    for _ in range(6):
        state = rng.getstate()
        honest, _cadence = run(rng, None)
        assert high(honest) == [], honest.alerts
        at = rng.randrange(5, STEPS - 2)  # after the first steps, which set the cadence
        attack = (rng.choice(["extra", "every", "function"]), at)
        rng.setstate(state)
        guard, _ = run(rng, attack)
        found = [(a.rule, a.step, a.message[:100]) for a in high(guard)]
        assert found and found[0][:2] == ("TG1303", at), (attack, found)
        if attack[0] != "every":  # a one-off change the loop declares is its own
            rng.setstate(state)
            declared, _ = run(rng, attack, declare=True)
            assert high(declared) == [], declared.alerts
