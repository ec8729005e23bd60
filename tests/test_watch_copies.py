"""A watched model can be copied and saved whole (red team 2026-12-05, h02_deepcopy.py).

Keeping the best model with ``copy.deepcopy(model)``, starting an EMA mid-run and
``torch.save(model)`` raised ``TypeError: cannot pickle 'module' object``: the guard's
forward hooks on the model were bound methods of an object holding ``torch``.  Each
run here draws (seed printed; TRAINGUARD_TEST_SEED reruns one) the optimizer, how many
copies are made, at which steps, and how (deepcopy, or ``torch.save`` then
``torch.load(weights_only=False)``); the copies are used (an EMA updated from the model,
forwards run).  Invariants: every copy works, holds none of the guard (its hooks run
nothing, the guard sees none of its forwards), the honest run stays below high, and
the run is still watched after the copies (a weight edit outside the optimizer made
later is TG1301 at its step).
"""

from __future__ import annotations

import copy
import io
import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.forwards import GuardHook, detached  # noqa: E402

STEPS = 14
REGISTRIES = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def _guard_hooks(model: Any) -> list[Any]:
    return [
        h
        for m in model.modules()
        for reg in REGISTRIES
        for h in getattr(m, reg).values()
        if isinstance(h, GuardHook)
    ]


def _copy(model: Any, how: str) -> Any:
    if how == "deepcopy":
        return copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _plan(rng: random.Random) -> tuple[str, dict[int, str], int]:
    copies = {
        rng.randrange(0, STEPS - 4): rng.choice(["deepcopy", "save-load"])
        for _ in range(rng.randint(1, 3))
    }
    return rng.choice(sorted(sc.OPTIMIZERS)), copies, max(copies) + 2


@pytest.mark.parametrize("tamper", [False, True])
def test_copies_and_saves_of_a_watched_model_work_and_carry_no_guard(tamper: bool) -> None:
    rng = seeded()
    optimizer, copies, tamper_at = _plan(rng)
    made: list[Any] = []
    watcher: list[Any] = []

    def use_copies(step: int, model: Any, opt: Any) -> None:
        if not watcher:
            watcher.append(_guard_hooks(model)[0].owner)
        if step in copies:
            made.append(_copy(model, copies[step]))
        seen = watcher[0].seen
        x = torch.randn(4, 8)
        with torch.no_grad():
            for kept in made:  # an EMA of the weights, and a forward of the copy
                for e, p in zip(kept.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 0.1)
                kept(x)
        assert watcher[0].seen == seen, "a copy's forward reached the guard"
        if tamper and step == tamper_at:
            with torch.no_grad():
                model[0].weight.mul_(0.5)

    guard = sc.run(STEPS, optimizer=optimizer, sabotage=use_copies)
    assert made
    for kept in made:
        assert _guard_hooks(kept) == []
        hooks = [h for m in kept.modules() for reg in REGISTRIES for h in getattr(m, reg).values()]
        assert all(h is detached for h in hooks), hooks
    high = [a for a in guard.alerts if a.severity >= Severity.HIGH]
    if not tamper:
        assert high == [], high
    else:
        # The edit is made after guard.step of step ``tamper_at``: its step is the next.
        assert any(a.rule == "TG1301" and a.step == tamper_at + 1 for a in high), high
