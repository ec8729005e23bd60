"""trainguard's own module state and the OS reads behind its clock (red team 2026-12-05,
A12: ``update_models.MODELS.clear()``, ``state_models.MODELS.clear()``,
``direction.SIZE_TOLERANCE = 1e9`` silenced the update check; A11b: ``os.pread``
wrapped to fake /proc schedstat's run-queue delay).

Each run draws (seed printed; TRAINGUARD_TEST_SEED reruns one) a member of the family
from what trainguard.monitor's modules hold *now* (no list of names): a numeric
constant rebound, a table emptied, an entry removed or replaced, a class constant
set, a function's numeric defaults changed; made before ``watch()`` or after a random step.
Invariant: TG1304 critical at step 0 ("changed before watch()") or at the next step,
naming the global; an honest run is silent.  ``os.pread``/``os.open`` replaced mid-run
is TG1304 at the next step (the guard keeps reading through the functions captured at
import).
"""

from __future__ import annotations

import os
import random
import types
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import ownstate  # noqa: E402

Undo = Callable[[], None]


def _candidates() -> list[tuple[str, str, Callable[[random.Random], Undo]]]:
    """(module, global, how to change it) for what the monitor's modules hold now."""
    found: list[tuple[str, str, Callable[[random.Random], Undo]]] = []
    for mname, mod in sorted(ownstate.modules().items()):
        for name, value in list(vars(mod).items()):
            if name.startswith("__") or (mname, name) in ownstate.MUTABLE:
                continue
            if type(value) in (int, float) and name.isupper():
                found.append((mname, name, _rebind(mod, name, value * 1000 + 1)))
            elif type(value) is dict and value:
                found.append((mname, name, _edit_table(value)))
            elif isinstance(value, type) and value.__module__ == mname:
                consts = [k for k, v in vars(value).items() if type(v) in (int, float, str)]
                if consts:
                    found.append((mname, name, _class_const(value, consts)))
            elif isinstance(value, types.FunctionType) and any(
                type(d) in (int, float) for d in value.__defaults__ or ()
            ):
                found.append((mname, name, _defaults(value)))
    return found


def _rebind(mod: Any, name: str, new: Any) -> Callable[[random.Random], Undo]:
    def do(rng: random.Random) -> Undo:
        old = getattr(mod, name)
        setattr(mod, name, new)
        return lambda: setattr(mod, name, old)

    return do


def _edit_table(table: dict[Any, Any]) -> Callable[[random.Random], Undo]:
    def do(rng: random.Random) -> Undo:
        saved = dict(table)
        how = rng.choice(["clear", "pop", "replace"])
        key = rng.choice(list(table))
        if how == "clear":
            table.clear()
        elif how == "pop":
            table.pop(key)
        else:
            table[key] = object()

        def undo() -> None:  # the same entries in the same order
            table.clear()
            table.update(saved)

        return undo

    return do


def _class_const(cls: type, names: list[str]) -> Callable[[random.Random], Undo]:
    def do(rng: random.Random) -> Undo:
        name = rng.choice(names)
        old = vars(cls)[name]
        setattr(cls, name, old * 2 if not isinstance(old, str) else old + "x")
        return lambda: setattr(cls, name, old)

    return do


def _defaults(fn: types.FunctionType) -> Callable[[random.Random], Undo]:
    def do(rng: random.Random) -> Undo:
        old = fn.__defaults__ or ()
        fn.__defaults__ = tuple(d * 2 + 1 if type(d) in (int, float) else d for d in old)
        return lambda: setattr(fn, "__defaults__", old)

    return do


def test_trainguards_own_tables_and_constants_changed_are_critical_at_their_step() -> None:
    rng = seeded()
    module, name, change = rng.choice(_candidates())
    at = rng.choice([None, rng.randrange(1, 6)])  # None: before watch()
    undo: list[Undo] = []

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if step == at:
            undo.append(change(rng))

    try:
        if at is None:
            undo.append(change(rng))
        guard = sc.run(8, optimizer=rng.choice(["sgd", "adam"]), sabotage=sabotage)
    finally:
        for u in undo:
            u()
    print(module, name, at, [(a.rule, a.step, a.message[:160]) for a in guard.alerts])
    own = [a for a in guard.alerts if "guard itself" in a.message]
    assert own, (module, name)
    assert own[0].rule == "TG1304" and own[0].severity == Severity.CRITICAL
    assert own[0].step == (0 if at is None else at + 1)
    assert f"{module}.{name}" in own[0].message
    # Restored: the next run is silent.
    assert sc.run(4).alerts == []


def test_the_os_reads_behind_the_clock_replaced_mid_run_are_named() -> None:
    rng = seeded()
    which, at = rng.choice(["pread", "open", "close"]), rng.randrange(1, 6)
    real = getattr(os, which)
    undo: list[Undo] = []

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if step == at:
            setattr(os, which, lambda *a: real(*a))
            undo.append(lambda: setattr(os, which, real))

    try:
        guard = sc.run(8, sabotage=sabotage)
    finally:
        for u in undo:
            u()
    print(which, at, [(a.rule, a.step, a.message[:160]) for a in guard.alerts])
    found = [a for a in guard.alerts if a.rule == "TG1304" and a.severity >= Severity.HIGH]
    assert found and found[0].step == at + 1 and "os.pread/open/close" in found[0].message
