"""Issue 12, red team family timing_2: small sleeps in every phase at once (so every phase
slows alike and looks like contention) against real CPU contention that must stay quiet.

Generated: the sleep per step, where it sits (the loop, or split between the loop and a
loss function patched before watch()), and the start step. Seed printed; rerun one with
TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.monitor.checks.sleep import SleepCheck, _run_delay  # noqa: E402

pytestmark = pytest.mark.skipif(_run_delay() is None, reason="needs /proc/thread-self/schedstat")


def blocked_alerts(guard: Any) -> list[tuple[int, str]]:
    return [
        (a.step, a.severity.name)
        for a in guard.alerts
        if a.rule == "TG1307" and a.evidence.get("phase") == "blocked"
    ]


def _sleep_from(at: int, seconds: float, flag: list[bool], step: int, *_: Any) -> None:
    if step >= at:
        flag[0] = True
        time.sleep(seconds)


def _slow_loss(original: Any, seconds: float, flag: list[bool], *a: Any, **k: Any) -> Any:
    if flag[0]:
        time.sleep(seconds)
    return original(*a, **k)


def test_small_sleeps_in_every_phase_are_high_and_contention_is_not() -> None:
    rng = seeded()
    for _ in range(2):
        at, seconds = rng.randrange(20, 26), rng.uniform(0.01, 0.03)
        split = rng.random() < 0.5
        flag = [False]
        original = torch.nn.functional.mse_loss
        if split:  # half of it inside the loss, patched before watch() started
            slow = functools.partial(_slow_loss, original, seconds / 2, flag)
            torch.nn.functional.mse_loss = functools.wraps(original)(slow)
        loop_sleep = seconds / 2 if split else seconds
        try:
            patch = functools.partial(_sleep_from, at, loop_sleep, flag)
            guard = sc.run(at + 14, sabotage=patch, min_stall_seconds=0.05)
        finally:
            torch.nn.functional.mse_loss = original
        found = blocked_alerts(guard)
        print(at, round(seconds, 4), split, found)
        # Sleeps start after guard.step of step `at`; 8 of 10 steps are needed.
        assert found and at + 8 <= found[0][0] <= at + 12 and found[0][1] == "HIGH", found


def test_cpu_contention_and_an_honest_run_do_not_look_like_sleeps() -> None:
    guard = sc.run(60, min_stall_seconds=0.05)
    assert blocked_alerts(guard) == []
    check = next(c for c in guard.checks if isinstance(c, SleepCheck))
    assert check.blocked is not None  # it measured
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        guard = sc.run(60, min_stall_seconds=0.05)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print([(a.rule, a.step, a.severity.name, a.message[:100]) for a in guard.alerts])
    assert blocked_alerts(guard) == []
