"""Budget mode: the per-step checks that became schedule units still find every change.

The guard's self-check (unit ``integrity``) and the parameter identity check (unit
``params``) run at the steps the schedule draws with the run's key.  Each run compares
with start-up (self-check) or with what its last run saw (identity), so a change made
at a step the unit skips is found at the first step the unit is drawn after it: not
earlier (it did not run), not later (nothing is lost), and an honest run is silent.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
import trainguard.monitor.budget as budget  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import integrity  # noqa: E402
from trainguard.monitor.alerts import Context  # noqa: E402
from trainguard.monitor.budget import WARMUP_STEPS  # noqa: E402
from trainguard.monitor.checks.base import StepEnd  # noqa: E402

Change = Callable[[random.Random, Any, Any, Any], str]


def _shadow(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    obj = rnd.choice([guard, guard.sink, *guard.checks])
    names = [n for n in dir(type(obj)) if callable(getattr(type(obj), n, None))]
    name = rnd.choice([n for n in names if not n.startswith("__")])
    real = getattr(obj, name)
    setattr(obj, name, lambda *a, **k: real(*a, **k))  # even a faithful wrapper
    return f"shadow {type(obj).__name__}.{name}"


def _checks(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    how = rnd.choice(["empty", "drop", "replace"])
    if how == "empty":
        guard.checks[:] = []
    elif how == "drop":
        del guard.checks[rnd.randrange(len(guard.checks))]
    else:
        guard.checks = list(guard.checks)
    return f"checks {how}"


def _pinned(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    name = rnd.choice(["sink", "tamper", "recorder", "fp", "direction"])
    setattr(guard, name, copy.copy(getattr(guard, name)))
    return f"pinned {name}"


def _replace(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    layer = rnd.choice([m for m in model if isinstance(m, torch.nn.Linear)])
    kind = rnd.choice(["weight", "bias"])
    setattr(layer, kind, torch.nn.Parameter(getattr(layer, kind).detach().clone()))
    return f"replace {kind}"


def _freeze(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    name, p = rnd.choice(list(model.named_parameters()))
    p.requires_grad_(False)
    return f"freeze {name}"


def _group(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    held = opt.param_groups[0]["params"]
    i = rnd.randrange(len(held))
    held[i] = torch.nn.Parameter(held[i].detach().clone())
    return f"group swap {i}"


def _lr(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    group = opt.param_groups[0]
    group["lr"] = group["lr"] * rnd.choice([0.1, 3.0, 10.0])
    return "lr undeclared"


def _decay(rnd: random.Random, guard: Any, model: Any, opt: Any) -> str:
    opt.param_groups[0]["weight_decay"] = rnd.choice([0.1, 0.5])
    return "weight_decay undeclared"


# Per unit: the changes it finds.
SELF: list[Change] = [_shadow, _checks, _pinned]
PARAMS: list[Change] = [_replace, _freeze, _group]
HYPER: list[Change] = [_lr, _decay]
CHANGES = {"integrity": SELF, "params": PARAMS, "hyper": HYPER}


def _ran(guard: Any, unit: str) -> list[int]:
    """The steps ``unit`` ran at."""
    if unit == "integrity":
        return list(integrity._checks[guard].ran)
    return list(guard.schedule.recent[unit])


def _found(guard: Any, unit: str) -> list[int]:
    """The steps of the unit's own alerts."""
    if unit == "integrity":
        return [a.step for a in guard.alerts if a.rule == "TG1304"]
    if unit == "hyper":
        return [a.step for a in guard.alerts if a.rule == "TG1303"]
    via = ("identity", "requires_grad")  # ParameterIdentityCheck's, not the tamper check's
    return [a.step for a in guard.alerts if a.rule == "TG1301" and a.evidence.get("via") in via]


def _end() -> StepEnd:
    return StepEnd(None, None, 0.0, [])


def _train(
    rnd: random.Random, steps: int, change: Change | None, at: int, declare: bool = False
) -> tuple[Any, str]:
    """``declare``: the loop changes the learning rate and weight decay itself at random
    steps and declares each only at the step it made it (honest)."""
    torch.manual_seed(rnd.randrange(999))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = rnd.choice([torch.optim.Adam, torch.optim.SGD])(model.parameters(), lr=1e-2)
    guard = trainguard.watch(
        model, opt, ledger=None, hang_seconds=None, budget=0.02, min_stall_seconds=0.25
    )
    what = ""
    for step in range(steps):
        loss = model(torch.randn(8, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        lr, hyper = None, None
        if declare and rnd.random() < 0.15:  # set for this step, before it (nanoGPT)
            lr = rnd.choice([1e-3, 5e-3, 1e-2, 2e-2])
            for g in opt.param_groups:
                g["lr"] = lr
        if declare and rnd.random() < 0.1:
            hyper = {"weight_decay": rnd.choice([0.0, 1e-4, 1e-2])}
            for g in opt.param_groups:
                g["weight_decay"] = hyper["weight_decay"]
        opt.step()
        guard.step(loss=loss, lr=lr, hyper=hyper)
        if change is not None and step == at:
            what = change(rnd, guard, model, opt)
    guard.close()
    return guard, what


def test_each_new_unit_finds_a_change_at_the_first_step_it_is_drawn_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Generative: a random chance per unit (what a budget below the fixed costs gives),
    a random change of a random kind at a random step after the warm-up; the unit's
    alert comes at the first step the unit ran after the change, never before it."""
    rnd = seeded()
    chance = rnd.uniform(0.25, 0.5)
    monkeypatch.setattr(
        budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, chance), 0)
    )
    drawn = 0
    for _ in range(5):
        unit = rnd.choice(sorted(CHANGES))
        change = rnd.choice(CHANGES[unit])
        at = rnd.randrange(WARMUP_STEPS, WARMUP_STEPS + 10)
        guard, what = _train(rnd, at + 30, change, at)
        ran = _ran(guard, unit)
        after = [s for s in ran if s > at]
        found = _found(guard, unit)
        print(unit, what, f"chance {chance:.3f}", "at", at, "ran", after[:5], "found", found[:3])
        assert not [s for s in found if s <= at]
        assert [s for s in range(WARMUP_STEPS, at + 30) if s not in ran], "never skipped"
        if after:
            drawn += 1
            assert found and found[0] == after[0], (what, after[:3], found[:3])
        else:  # not drawn after the change in this run: nothing may claim it found it
            assert not found
    assert drawn  # (each run misses with probability at most 0.75**29)


def test_honest_budget_runs_with_the_new_units_are_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Generative: units drawn at a random share of the steps; an honest run raises
    nothing high, and both new units ran at some steps and skipped others."""
    rnd = seeded()
    chance = rnd.uniform(0.25, 0.6)
    monkeypatch.setattr(
        budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, chance), 0)
    )
    for _ in range(2):
        guard, _ = _train(rnd, 60, None, -1, declare=True)
        assert [a for a in guard.alerts if a.severity >= Severity.HIGH] == [], [
            (a.step, a.rule, a.message[:150]) for a in guard.alerts
        ]
        assert not [a for a in guard.alerts if a.rule == "TG1303"]
        for unit in sorted(CHANGES):
            ran = [s for s in _ran(guard, unit) if s >= WARMUP_STEPS]
            assert 0 < len(ran) < 60 - WARMUP_STEPS, (unit, chance, ran)


def test_the_calibration_unit_measures_at_drawn_steps_and_finds_an_interception() -> None:
    """Generative: the sleep check armed as the guard arms it (the draw for step t+1 at
    step t's pre-hook, from a keyed schedule at a random chance); torch's reference made
    a random factor slower from a random step.  The pair is measured exactly at the drawn
    steps, and TG1307 (phase torch) comes at the SUSTAINED-th drawn step after the
    change; without the change, nothing."""
    from trainguard.monitor.calibration import SLOWER, SUSTAINED, WINDOW
    from trainguard.monitor.calibration import WARMUP as CAL_WARMUP
    from trainguard.monitor.checks.sleep import SleepCheck

    rnd = seeded()
    for _ in range(20):
        schedule = budget.Schedule(rnd.randbytes(32), 0.02, ["calibration"])
        schedule.chance = {"calibration": rnd.uniform(1 / 64, 0.6)}
        check = SleepCheck(0.25)
        now = [0]  # the step measure() is called at
        check.close()
        at = rnd.randrange(WARMUP_STEPS + 1, WARMUP_STEPS + 40)
        change = rnd.random() < 0.7
        factor = rnd.uniform(SLOWER + 0.5, 5.0)
        ratio = rnd.uniform(1.0, 10.0)

        def measure(
            factor: float = factor,
            change: bool = change,
            at: int = at,
            ratio: float = ratio,
            now: list[int] = now,
        ) -> tuple[float, float]:
            slow = factor if change and now[0] >= at else 1.0
            return 1e-5 * ratio * slow, 1e-5

        check.calibration.measure = measure  # type: ignore[method-assign]
        found: list[int] = []
        steps = at + 600
        for step in range(steps):
            now[0] = step
            check.arm("calibration" in schedule.runs(step + 1))
            alerts = check.step_end(Context(step, 0), _end())
            found += [a.step for a in alerts if a.evidence.get("phase") == "torch"]
        p = schedule.chance["calibration"]
        drawn = [s for s in range(steps) if s < WARMUP_STEPS or schedule.draw("calibration", s) < p]
        assert list(check.measured) == drawn
        assert drawn[:CAL_WARMUP] == list(range(CAL_WARMUP))
        after = [s for s in drawn if s >= at]
        print(f"chance {schedule.chance}", "at", at, change, "drawn after", after[:9], found)
        # The window holds WINDOW measurements after the warm-up's before it judges.
        full = drawn[CAL_WARMUP + WINDOW - 1] if len(drawn) >= CAL_WARMUP + WINDOW else None
        if change and len(after) >= SUSTAINED and full is not None:
            assert found[:1] == [max(after[SUSTAINED - 1], full)]
        else:
            assert found == []
