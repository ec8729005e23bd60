"""The learning rate is what the schedule gives for *this* step (TG1303).

Red team 3: a learning rate set back to the last step's value at a decay boundary
(StepLR's halving undone) did not change between the two steps, so the hyper check,
which judged only changes, saw it 3 steps late, at the scheduler's next change.  Now
the settings a replayable schedule drives are held to the recomputed schedule at every
check (monitor/schedule.py, checks/hyper.py).

Generated: a torch scheduler with random settings, an optimizer with one or two param
groups, and a tamper at a random step (the rate scaled; held at the last step's value
across a change; a decay skipped for good, the rate written back every step): TG1303 at
that step.  Honest runs of the same schedules are silent, and so are loops that set the
rate themselves and declare it (``lr=``), with or without a scheduler beside them.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

nn = torch.nn
S = torch.optim.lr_scheduler
STEPS = 24


def scheduler(rng: random.Random, opt: Any) -> tuple[str, Any]:
    name = rng.choice(
        ["step", "multistep", "exponential", "cosine", "onecycle", "linear", "sequential"]
    )
    if name == "step":
        return name, S.StepLR(opt, step_size=rng.randint(2, 6), gamma=rng.choice([0.5, 0.3, 2.0]))
    if name == "multistep":
        marks = sorted(rng.sample(range(2, STEPS), 3))
        return name, S.MultiStepLR(opt, marks, gamma=rng.choice([0.5, 0.1]))
    if name == "exponential":
        return name, S.ExponentialLR(opt, gamma=rng.uniform(0.8, 0.97))
    if name == "cosine":
        return name, S.CosineAnnealingLR(opt, T_max=rng.randint(5, 30))
    if name == "onecycle":
        cycle = "momentum" in opt.defaults or "betas" in opt.defaults
        return name, S.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 5, cycle_momentum=cycle)
    if name == "linear":
        return name, S.LinearLR(opt, start_factor=rng.uniform(0.1, 0.5), total_iters=STEPS // 2)
    first = S.LinearLR(opt, start_factor=0.2, total_iters=5)
    then = rng.choice(
        [S.StepLR(opt, step_size=3, gamma=0.5), S.CosineAnnealingLR(opt, T_max=STEPS)]
    )
    return name, S.SequentialLR(opt, [first, then], milestones=[5])


def setup(seed: int, rng: random.Random) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    groups: Any = list(model.parameters())
    if rng.random() < 0.5:
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    kind = rng.choice(["sgd", "adam", "adamw"])
    if kind == "sgd":
        return model, torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return model, getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW"}[kind])(groups, lr=1e-2)


def honest_rates(seed: int, rng_state: Any) -> list[list[float]]:
    """Each step's learning rates of an honest run (what opt.step uses at that step)."""
    rng = random.Random()
    rng.setstate(rng_state)
    _, opt = setup(seed, rng)
    _, sched = scheduler(rng, opt)
    rates = []
    for _ in range(STEPS):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return rates


def train(
    seed: int,
    rng: random.Random,
    tamper: Any = None,
    manual: Any = None,
    with_scheduler: bool = True,
    budget: float | None = None,
) -> tuple[Any, str]:
    model, opt = setup(seed, rng)
    name, sched = scheduler(rng, opt) if with_scheduler else ("none", None)
    guard = trainguard.watch(
        model, opt, ledger=None, hang_seconds=None, scheduler=sched, budget=budget
    )
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    for step in range(STEPS):
        declared = None
        if manual is not None and manual(step) is not None:
            declared = manual(step)
            for g in opt.param_groups:
                g["lr"] = declared
        if tamper is not None:
            tamper(step, opt)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        guard.step(loss=loss, lr=declared)
    guard.close()
    return guard, name


@pytest.mark.parametrize("draw", range(4))
def test_a_rate_off_the_schedule_is_caught_at_its_step(draw: int) -> None:
    rng = seeded()
    seed = rng.randrange(2**31)
    state = rng.getstate()
    rates = honest_rates(seed, state)
    how = rng.choice(["scale", "hold", "skip"])
    group = rng.randrange(len(rates[0]))
    moves = [t for t in range(2, STEPS) if abs(rates[t][group] - rates[t - 1][group]) > 1e-9]
    if how != "scale" and not moves:
        how = "scale"  # a schedule that stays flat here: nothing to hold
    at = rng.choice(moves) if how != "scale" else rng.randrange(2, STEPS)
    factor = rng.choice([0.25, 0.5, 2.0, 4.0])
    old = rates[at - 1][group]

    def tamper(step: int, opt: Any) -> None:
        g = opt.param_groups[group]
        if how == "scale" and step == at:
            g["lr"] = g["lr"] * factor
        elif (how == "hold" and step == at) or (how == "skip" and step >= at):
            g["lr"] = old

    rng.setstate(state)
    guard, name = train(seed, rng, tamper)
    found = [(a.rule, a.step, a.message[:90]) for a in guard.alerts]
    print(name, how, "group", group, "at", at, found)
    caught = [a.step for a in guard.alerts if a.rule == "TG1303" and a.severity >= Severity.HIGH]
    assert caught and caught[0] == at, (name, how, at, found)
    assert not [a for a in guard.alerts if a.severity >= Severity.HIGH and a.step < at], found


def test_on_a_budget_a_decay_skipped_is_caught_at_the_first_step_the_unit_runs() -> None:
    """Budget mode: the hyper unit runs at keyed steps; a rate written back to its value
    before a change at every step from then on is TG1303 at the first step it runs at or
    after the change (read from the run's schedule), and nothing high comes before."""
    rng = seeded()
    seed = rng.randrange(2**31)
    state = rng.getstate()
    rates = honest_rates(seed, state)
    moves = [t for t in range(2, STEPS) if abs(rates[t][0] - rates[t - 1][0]) > 1e-9]
    if not moves:
        pytest.skip("a schedule flat over the run: nothing to skip")
    at = rng.choice(moves)
    old = rates[at - 1][0]

    def tamper(step: int, opt: Any) -> None:
        if step >= at:
            opt.param_groups[0]["lr"] = old

    rng.setstate(state)
    guard, name = train(seed, rng, tamper, budget=0.05)
    found = [(a.rule, a.step, a.message[:90]) for a in guard.alerts]
    drawn = [s for s in guard.schedule.recent["hyper"] if s >= at]
    print(name, "at", at, "drawn", drawn[:5], found)
    caught = [a.step for a in guard.alerts if a.rule == "TG1303" and a.severity >= Severity.HIGH]
    assert not [a for a in guard.alerts if a.severity >= Severity.HIGH and a.step < at], found
    assert caught[:1] == drawn[:1], (name, at, drawn[:5], found)


def test_honest_schedules_and_declared_rates_are_silent() -> None:
    rng = seeded()
    for budget in (None, None, 0.05):
        guard, name = train(rng.randrange(2**31), rng, budget=budget)
        assert [a for a in guard.alerts if a.severity >= Severity.HIGH] == [], (name, guard.alerts)

    def warmup(step: int) -> float | None:  # by hand, declared, then the scheduler's own
        return 1e-3 * (step + 1) if step < 6 else None

    def nanogpt(step: int) -> float:
        return 3e-3 * min(1.0, (step + 1) / 5) * (0.55 + 0.45 * (1 - step / STEPS))

    for manual, with_scheduler in [(warmup, True), (nanogpt, False), (nanogpt, True)]:
        guard, name = train(rng.randrange(2**31), rng, manual=manual, with_scheduler=with_scheduler)
        high = [a for a in guard.alerts if a.severity >= Severity.HIGH]
        assert high == [], (name, manual.__name__, guard.alerts)
