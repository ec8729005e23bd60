"""Per-step routes that are not functions (red team 2026-12-05, A06: a proxy object for
``Variable._execution_engine``, through which every backward runs; A07/A07p: an entry
of ``torch.utils.data._utils.collate.default_collate_fn_map`` replaced, which rewrites
every batch of that type).

Each run draws (seed printed; TRAINGUARD_TEST_SEED reruns one) which route (the engine,
or a random key of the collate map), what replaces it (a faithful proxy or wrapper:
the effect does not matter, the identity does) and when (before ``watch()`` or after a
random step).  Invariant: planted is TG1304 high at step 0 naming the route, made
mid-run is TG1304 at the next step; an honest run is silent.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from torch.autograd.variable import Variable  # noqa: E402
from torch.utils.data._utils import collate  # noqa: E402

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402


class _Proxy:
    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _engine(rng: random.Random) -> tuple[str, Callable[[], None]]:
    real = Variable._execution_engine
    Variable._execution_engine = _Proxy(real)
    return "Variable._execution_engine", lambda: setattr(Variable, "_execution_engine", real)


def _collate(rng: random.Random) -> tuple[str, Callable[[], None]]:
    table = collate.default_collate_fn_map
    key = rng.choice(list(table))
    real = table[key]

    def wrapper(batch: Any, *, collate_fn_map: Any = None) -> Any:
        return real(batch, collate_fn_map=collate_fn_map)

    table[key] = wrapper
    return "torch.utils.data._utils.collate", lambda: table.__setitem__(key, real)


def test_non_function_routes_replaced_before_or_during_the_run_are_named() -> None:
    rng = seeded()
    change = rng.choice([_engine, _collate])
    at = rng.choice([None, rng.randrange(1, 6)])
    undo: list[Callable[[], None]] = []
    named: list[str] = []

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if step == at:
            label, u = change(rng)
            named.append(label)
            undo.append(u)

    try:
        if at is None:
            label, u = change(rng)
            named.append(label)
            undo.append(u)
        guard = sc.run(8, sabotage=sabotage)
    finally:
        for u in undo:
            u()
    print(named, at, [(a.rule, a.step, a.severity, a.message[:200]) for a in guard.alerts])
    high = [a for a in guard.alerts if a.rule == "TG1304" and a.severity >= Severity.HIGH]
    assert high and high[0].step == (0 if at is None else at + 1), named
    assert named[0] in high[0].message
    assert sc.run(4).alerts == []  # restored: silent
