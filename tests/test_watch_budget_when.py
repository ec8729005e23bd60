"""Budget mode: a check left out of a step costs nothing there, and a change is still found.

Checks that used to run at every step of a budget run (module settings, buffers,
hyper-parameters, parameter identity) are units of the schedule, armed a step ahead: a unit
drawn for step k compares the window before k, and a state comparison compares with the
state its last run saw.  The version counters still run at every step (a one-off write at a
boundary left out could never be seen again).  Generated: a budget run with a fixed key and
one change drawn among a module setting, a buffer, a hyper-parameter, a parameter object
replaced, a single in-place write between two steps, and a sleep in every step from some
step on, made at a random step after the warm-up.  Each must be found at high, by its own
rule, at the first step its unit is drawn at or after the change (read from the run's
schedule, not hard-coded; the write at its own step); one that is never drawn again is never
found, and nothing is high before the change.  The honest twin of the run raises nothing high.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402
from trainguard.monitor.budget import WARMUP_STEPS  # noqa: E402
from trainguard.monitor.checks.sleep import WINDOW  # noqa: E402
from trainguard.monitor.clock import run_delay  # noqa: E402

STEPS = 100
# Seconds per step, over the sleep rule's floor (a quarter of the warm-up's median step,
# whose full checks are slow), under a stall's; slept at WINDOW steps from the change.
SLEEP = 0.12
MIN_STALL = 0.25  # the sleep rule's SUSTAINED sleeps add up to more than this


class Net(torch.nn.Module):
    """A setting (dropout), a buffer read by forward (a mask) and one its forward changes
    itself (BatchNorm's statistics: must not be taken for a change)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.1)
        self.fc2 = torch.nn.Linear(16, 1)
        self.register_buffer("mask", torch.ones(16))

    def forward(self, x: Any) -> Any:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))) * self.mask)


def _replace(model: Any, opt: Any) -> None:
    model.fc2.weight = torch.nn.Parameter(model.fc2.weight.detach().clone())


def _write(model: Any, opt: Any) -> None:
    with torch.no_grad():
        model.fc1.weight.add_(1e-3)


Change = Callable[[Any, Any], None]
EVERY_STEP = "every step"  # not a unit: compared at every boundary
# kind: (the change, made before the step's forward; whether at every step from then on;
# its unit; its rule; what the alert's evidence must say)
KINDS: dict[str, tuple[Change, bool, str | None, str, dict[str, Any]]] = {
    "setting": (lambda m, o: setattr(m.drop, "p", 0.0), False, "settings", "TG1318", {}),
    "buffer": (lambda m, o: m.mask.mul_(0.5), False, "buffers", "TG1317", {}),
    "hyper": (lambda m, o: o.param_groups[0].update(lr=0.05), False, "hyper", "TG1303", {}),
    "replaced": (_replace, False, "params", "TG1301", {"via": "identity"}),
    "write": (_write, False, EVERY_STEP, "TG1301", {"via": "version"}),
    "sleep": (lambda m, o: time.sleep(SLEEP), True, None, "TG1307", {}),
}


def train(rng: random.Random, budget: float, key: bytes, change: tuple[str, int] | None) -> Any:
    torch.manual_seed(rng.randrange(2**31))
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    guard = tgw.watch(
        model, opt, budget=budget, key=key, min_stall_seconds=MIN_STALL, hang_seconds=None
    )
    for step in range(STEPS):
        if change is not None:
            kind, at = change
            apply, repeated, *_ = KINDS[kind]
            if step == at or (repeated and at < step < at + WINDOW):
                apply(model, opt)
        idx = torch.randint(0, 64, (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        guard.step(loss=loss, batch=x[idx])
    guard.close()
    return guard


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


def test_changes_are_found_at_the_first_step_their_unit_is_drawn_at_or_after() -> None:
    rng = seeded()
    kinds = sorted(KINDS) if run_delay() is not None else sorted(set(KINDS) - {"sleep"})
    budget = rng.choice([0.02, 0.1, 0.3])
    key = bytes(rng.randrange(256) for _ in range(32))
    state = rng.getstate()
    honest = train(rng, budget, key, None)
    assert high(honest) == [], [(a.rule, a.step, a.message) for a in high(honest)]
    for kind in rng.sample(kinds, 2):  # two per run: the warm-up's full checks take seconds
        at = rng.randrange(WARMUP_STEPS + 2, STEPS - 30)
        rng.setstate(state)
        guard = train(rng, budget, key, (kind, at))
        _, _, unit, rule, evidence = KINDS[kind]
        shown = [(a.rule, a.step, str(a.severity), a.message[:90]) for a in high(guard)]
        print(budget, kind, at, shown)
        assert [a for a in high(guard) if a.step < at] == [], shown
        found = [
            a
            for a in high(guard)
            if a.rule == rule and all(a.evidence.get(k) == v for k, v in evidence.items())
        ]
        if unit == EVERY_STEP:
            assert found and found[0].step == at, shown
            continue
        if unit is None:  # the step-time rules read their clocks at every step: the sleep
            # rule names SUSTAINED sleeps of WINDOW steps, the sustained slowdown of the
            # compute phase may come first
            assert found and at <= found[0].step < at + WINDOW, shown
            assert found[0].evidence.get("phase") in ("blocked", "compute"), shown
            continue
        drawn = [s for s in guard.schedule.recent[unit] if at <= s < STEPS]
        if not drawn:  # never drawn again in this run: never found
            assert found == [], shown
            continue
        assert found and found[0].step == drawn[0], (drawn[:5], shown)
