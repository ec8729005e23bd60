"""The guard notices when its own structure is changed under it.

Red team 2026-12-04 (/work/tmp/redteam_watch/REPORT.md #12, guard_selfpatch.py):
``guard.sink.raise_all`` shadowed by an instance attribute, ``guard.checks[:] = []``
and the sample indices cut to one element blinded the guard while weights were
sabotaged.  monitor/integrity.py: each is TG1304 (critical) at the step it
happens, delivered without going through the tampered objects.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.alerts import Alert  # noqa: E402


def _shadow(rnd: random.Random, guard: Any) -> str:
    """An instance attribute over a method of the guard, its sink, or a random check."""
    targets = [guard, guard.sink, *guard.checks]
    obj = rnd.choice(targets)
    methods = [
        n
        for n in dir(type(obj))
        if callable(getattr(type(obj), n, None)) and not n.startswith("__")
    ]
    name = rnd.choice(methods)
    real = getattr(obj, name)
    setattr(obj, name, lambda *a, **k: real(*a, **k))  # even a faithful wrapper
    return f"{type(obj).__name__}.{name}"


def _checks(rnd: random.Random, guard: Any) -> str:
    how = rnd.choice(["empty", "drop", "swap", "replace"])
    if how == "empty":
        guard.checks[:] = []
    elif how == "drop":
        del guard.checks[rnd.randrange(len(guard.checks))]
    elif how == "swap":
        guard.checks[0], guard.checks[-1] = guard.checks[-1], guard.checks[0]
    else:
        guard.checks = list(guard.checks)  # an equal list, another object
    return how


def _index(rnd: random.Random, guard: Any) -> str:
    # Only checks holding sample indices (a check with an empty index has none to edit).
    owners = [c for c in guard.checks if getattr(c, "index", None)]
    owner = rnd.choice([guard.direction.probe, *owners])
    key = rnd.choice(list(owner.index))
    how = rnd.choice(["cut", "fill", "dict"])
    if how == "cut":
        owner.index[key] = owner.index[key][:1]
    elif how == "fill":
        owner.index[key].fill_(0)
    else:
        owner.index = {k: v[:1] for k, v in owner.index.items()}
    return f"{type(owner).__name__} {how}"


def _pinned(rnd: random.Random, guard: Any) -> str:
    name = rnd.choice(["sink", "tamper", "recorder", "fp", "direction"])
    setattr(guard, name, getattr(guard, name))  # the same object: no change
    import copy

    setattr(guard, name, copy.copy(getattr(guard, name)))
    return name


def test_each_way_of_blinding_the_guard_is_critical_at_its_step() -> None:
    """Generative: a random blinding (shadowed method, check list, sample indices, pinned
    attribute) at a random step, in exact or budget mode; honest steps before it raise
    nothing of TG1304, and the alert reaches guard.alerts and the user's handler."""
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    for _ in range(6):
        torch.manual_seed(rnd.randrange(999))
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        seen: list[Alert] = []
        budget = rnd.choice([None, 0.05])
        guard = trainguard.watch(
            model, opt, ledger=None, hang_seconds=None, budget=budget, on_alert=seen.append
        )
        at, family = rnd.randrange(1, 6), rnd.choice([_shadow, _checks, _index, _pinned])
        what = ""
        for step in range(8):
            loss = model(torch.randn(8, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss)
            if step == at:
                what = family(rnd, guard)
        guard.close()
        print(family.__name__, what, budget, at)
        tampered = [a for a in guard.alerts if "guard itself" in a.message]
        assert tampered, (family.__name__, what)
        assert tampered[0].rule == "TG1304" and tampered[0].severity == Severity.CRITICAL
        assert tampered[0].step == at + 1  # the next hook or guard.step
        assert tampered[0] in seen
        assert not [a for a in guard.alerts if a.rule == "TG1304" and a.step <= at]
