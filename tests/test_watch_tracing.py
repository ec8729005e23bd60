"""Trace and profile functions and gc callbacks (red team 2026-12-05, A01/A15a: a
``sys.settrace`` callback zeroing a gradient on backward's return or rewriting
``clip_grad_norm_``'s ``max_norm`` in ``f_locals``; A17: a ``sys.setprofile`` set
before ``watch()`` to keep the surface check from learning its hot names).

Each run draws (seed printed; TRAINGUARD_TEST_SEED reruns one) the slot
(``sys.settrace``, ``sys.setprofile``, ``threading.settrace``, ``threading.setprofile``,
``gc.callbacks``), what is installed (a function, a partial, a callable object, a
lambda) and when (before ``watch()`` or after a random step).  Invariant: planted is
TG1304 high at step 0, made mid-run is TG1304 high at the next step; a profiler
(``cProfile``) planted is named at medium; an honest run is silent.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import random
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402


def _tracer(frame: Any, event: str, arg: Any = None, scale: float = 1.0) -> None:
    # gc calls its callbacks with two arguments (phase, info): one that raises fills the
    # run with unraisable-exception warnings, which pytest turns into a failure
    return None


class _Callable:
    def __call__(self, *args: Any) -> None:
        return None


def _install(rng: random.Random) -> tuple[str, Callable[[], None]]:
    fn = rng.choice([_tracer, functools.partial(_tracer, scale=0.1), _Callable(), lambda *a: None])
    slot = rng.choice(["sys.settrace", "sys.setprofile", "threading.settrace",
                       "threading.setprofile", "gc.callbacks"])  # fmt: skip
    if slot == "gc.callbacks":
        gc.callbacks.append(fn)
        return slot, lambda: gc.callbacks.remove(fn)
    module = sys if slot.startswith("sys") else threading
    name = slot.split(".")[1]
    getattr(module, name)(fn)
    return slot, lambda: getattr(module, name)(None)


def test_trace_profile_and_gc_callbacks_planted_or_set_mid_run_are_high() -> None:
    rng = seeded()
    at = rng.choice([None, rng.randrange(1, 6)])
    undo: list[Callable[[], None]] = []
    slots: list[str] = []

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if step == at:
            slot, u = _install(rng)
            slots.append(slot)
            undo.append(u)

    try:
        if at is None:
            slot, u = _install(rng)
            slots.append(slot)
            undo.append(u)
        guard = sc.run(8, sabotage=sabotage)
    finally:
        for u in undo:
            u()
    print(slots, at, [(a.rule, a.step, a.severity, a.message) for a in guard.alerts])
    if at is None and slots[0] == "gc.callbacks":  # given no frame: named at medium
        named = [a for a in guard.alerts if a.rule == "TG1304" and slots[0] in a.message]
        assert [(a.step, a.severity) for a in named] == [(0, Severity.MEDIUM)], slots
        return
    high = [a for a in guard.alerts if a.rule == "TG1304" and a.severity >= Severity.HIGH]
    assert high and high[0].step == (0 if at is None else at + 1), slots
    assert slots[0] in high[0].message
    assert sc.run(4).alerts == []  # removed: silent


def test_a_profiler_planted_is_named_at_medium() -> None:
    prof = cProfile.Profile()
    prof.enable()
    try:
        guard = sc.run(4)
    finally:
        prof.disable()
    print([(a.rule, a.step, a.severity, a.message) for a in guard.alerts])
    assert [(a.rule, a.step, a.severity) for a in guard.alerts] == [("TG1304", 0, Severity.MEDIUM)]
    assert "cProfile" in guard.alerts[0].message
