"""Issue 12 class 7 and red team class G: time told apart from contention by what the
kernel and a reference measurement say, not by this run's own early steps alone.

Generative and clock-free: the checks' decisions are fed measured-looking times drawn
here (step phases, run-queue waits, reference probe times), so nothing depends on how
fast this machine is.  Families:

* contention: every phase slower, or all of the extra time landing in one phase (what a
  busy two-core machine did to the guard's phase), with the extra time being a wait for
  a CPU: never high;
* a delay injected into one phase (the training's or the optimizer's), no CPU wait:
  high;
* the calibration pair: contention scales both probes, interception only torch's.

Seed printed; rerun one with TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.calibration import SLOWER, WARMUP, WINDOW, Calibration
from trainguard.monitor.checks.base import StepEnd
from trainguard.monitor.checks.timing import RECENT_STEPS, StallCheck, chance_of
from trainguard.monitor.stats import RobustWindow

torch = pytest.importorskip("torch")


PHASES = ("compute", "optimizer", "guard")


def usual_phases(rng: random.Random) -> dict[str, float]:
    step = rng.uniform(0.005, 0.2)
    weights = [rng.uniform(0.05, 1.0) for _ in PHASES]
    return {p: step * w / sum(weights) for p, w in zip(PHASES, weights, strict=True)}


def noisy(rng: random.Random, phases: dict[str, float]) -> dict[str, float]:
    return {p: t * rng.lognormvariate(0, 0.08) for p, t in phases.items()}


def feed(check: StallCheck, step: int, phases: dict[str, float], delay: float) -> list[Alert]:
    end = StepEnd(None, None, sum(phases.values()), [], phases=phases)
    return check.judge(Context(step, 0), end, delay)


def new_check(min_stall: float) -> StallCheck:
    check = StallCheck(RobustWindow(), min_stall)
    check.clock.close()  # the decisions below get their times from the test
    return check


def test_chance_of_is_a_binomial_tail() -> None:
    assert chance_of(0, 10, 0.3) == pytest.approx(1.0)
    assert chance_of(3, 3, 0.5) == pytest.approx(0.125)
    assert chance_of(2, 3, 0.5) == pytest.approx(0.5)


def test_contention_is_never_high_wherever_its_wait_lands() -> None:
    rng = seeded()
    for trial in range(40):
        usual = usual_phases(rng)
        step = sum(usual.values())
        base_delay = rng.uniform(0, 0.05) * step
        start, steps = rng.randrange(20, 60), rng.randrange(150, 300)
        factor = rng.uniform(1.5, 8.0)  # the busy machine's slowdown
        mode = rng.choice(["all", "one", "random"])
        victim = rng.choice(PHASES)
        check = new_check(rng.choice([0.0, 0.05, 0.1]) * step * 10)
        highs = []
        for s in range(steps):
            phases, delay = noisy(rng, usual), base_delay * rng.uniform(0.5, 1.5)
            if s >= start and rng.random() < 0.9:
                extra = (factor - 1) * step * rng.lognormvariate(0, 0.5)
                delay += extra  # the extra time is a wait for a CPU: that is contention
                if mode == "all":
                    phases = {p: t + extra * t / step for p, t in phases.items()}
                else:
                    where = victim if mode == "one" else rng.choice(PHASES)
                    phases[where] += extra
            highs += [a for a in feed(check, s, phases, delay) if a.severity >= Severity.HIGH]
        print(trial, mode, victim, round(factor, 2), start, [a.message[:80] for a in highs])
        assert highs == []


def test_a_delay_injected_into_one_phase_is_high() -> None:
    rng = seeded()
    for trial in range(40):
        usual = usual_phases(rng)
        step = sum(usual.values())
        where = rng.choice(["compute", "optimizer"])
        # Over the phase's own usual time again (1.75x is the sustained rule's bar; the
        # margin is for the noise drawn here).
        size = rng.uniform(max(1.2 * usual[where], 0.1 * step), 4 * step)
        start = rng.randrange(30, 60)
        check = new_check(0.05 * step * 10)
        found: list[Alert] = []
        for s in range(start + 60):
            phases = noisy(rng, usual)
            if s >= start:
                phases[where] += size * rng.uniform(0.9, 1.1)
            found += [
                a
                for a in feed(check, s, phases, rng.uniform(0, 0.02) * step)
                if a.severity >= Severity.HIGH
            ]
        print(trial, where, round(size / step, 2), start, [(a.step, a.message[:60]) for a in found])
        assert found and found[0].evidence["phase"] == where
        assert found[0].step <= start + 55


def test_contention_is_reported_once_per_window_as_medium() -> None:
    rng = seeded()
    usual = usual_phases(rng)
    step = sum(usual.values())
    check = new_check(0.0)
    found: list[Alert] = []
    for s in range(150):
        extra = 5 * step if s >= 40 else 0.0
        phases = dict(usual, guard=usual["guard"] + extra)
        found += feed(check, s, phases, extra)
    assert [a.severity for a in found] == [Severity.MEDIUM] * len(found)
    assert found and all(a.evidence["phase"] == "contention" for a in found)
    assert len(found) <= 1 + (150 - 40) // RECENT_STEPS


def probes(rng: random.Random, ratio: float, speed: float) -> tuple[float, float]:
    plain = 5e-6 * speed * rng.lognormvariate(0, 0.1)
    if rng.random() < 0.03:  # preempted inside the probe
        plain *= rng.uniform(5, 50)
    torch_s = plain * ratio * rng.lognormvariate(0, 0.1)
    if rng.random() < 0.03:
        torch_s *= rng.uniform(5, 50)
    return torch_s, plain


def test_calibration_tells_interception_from_contention() -> None:
    rng = seeded()
    for trial in range(60):
        cal = Calibration(torch)
        ratio = rng.uniform(1.0, 12.0)  # torch's dispatch against blake2b, per machine
        start = rng.randrange(WARMUP + 5, 80)
        intercept = rng.random() < 0.5
        factor = rng.uniform(SLOWER + 0.3, 6.0)  # what the interception adds to torch's ops
        speed, found = 1.0, []
        for s in range(start + 40):
            if rng.random() < 0.05:  # contention comes and goes, slowing both
                speed = rng.choice([1.0, rng.uniform(1.0, 6.0)])
            r = ratio * (factor if intercept and s >= start else 1.0)
            got = cal.judge(*probes(rng, r, speed))
            if got is not None:
                found.append((s, round(got, 2)))
        print(trial, round(ratio, 2), intercept, round(factor, 2), start, found)
        if intercept:
            assert found and start <= found[0][0] <= start + WINDOW + 2
        else:
            assert found == []


def test_calibration_probes_measure_and_the_profiler_is_exempt() -> None:
    cal = Calibration(torch)
    torch_s, plain_s = cal.measure()
    assert torch_s > 0 and plain_s > 0
    assert not cal.profiling()
    with torch.profiler.profile():
        assert cal.profiling()


def test_the_sleep_check_reports_interception_at_high() -> None:
    from trainguard.monitor.checks.sleep import SleepCheck

    rng = seeded()
    check = SleepCheck(0.1)
    check.close()
    found: list[Any] = []
    for s in range(WARMUP + 30):
        r = 4.0 * (3.0 if s >= WARMUP + 10 else 1.0)
        found += check.intercepted(Context(s, 0), *probes(rng, r, 1.0))
    assert [a.severity for a in found] == [Severity.HIGH]
    assert found[0].evidence["phase"] == "torch" and found[0].rule == "TG1307"


class _Spin:
    """A dispatch mode that burns CPU in proportion to every op's own time."""

    def __new__(cls, factor: float) -> Any:
        import time

        from torch.utils._python_dispatch import TorchDispatchMode

        clock = time.perf_counter

        class Spin(TorchDispatchMode):  # type: ignore[misc]
            def __torch_dispatch__(
                self, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                started = clock()
                out = func(*args, **(kwargs or {}))
                end = started + (clock() - started) * factor
                while clock() < end:
                    pass
                return out

        return Spin()


def test_a_spin_on_every_torch_op_entered_mid_run_is_high(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team #17 (spin_like_contention.py): a real dispatch-mode spin on every op,
    entered after watch() at a random step; the honest part of the run stays quiet.
    Exact mode measures the reference pair at every step; budget mode (here every
    unit at a keyed half of the steps) at the drawn ones, and finds it within as many
    of those."""
    import trainguard.monitor.budget as budget
    from tests import watch_scenarios as sc
    from trainguard.monitor.checks.sleep import SleepCheck

    rng = seeded()
    at, factor = rng.randrange(WARMUP + 8, WARMUP + 16), rng.uniform(2.0, 4.0)
    mode_budget = rng.choice([None, 0.05])
    monkeypatch.setattr(budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, 0.5), 0))
    model = sc.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = sc.tgw.watch(model, opt, hang_seconds=None, ledger=None, budget=mode_budget)
    sleep = next(c for c in guard.checks if isinstance(c, SleepCheck))
    x, y = sc.make_data()
    mode = _Spin(factor)

    def measured_after() -> list[int]:
        return [s for s in sleep.measured if s >= at]

    try:
        for step in range(at + 200):
            if step > at and len(measured_after()) >= WINDOW + 8:
                break
            if step == at:
                mode.__enter__()
            loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=x[:32])
    finally:
        if guard.step_index > at:
            mode.__exit__(None, None, None)
        guard.close()
    torch_phase = [a for a in guard.alerts if a.evidence.get("phase") == "torch"]
    print(at, round(factor, 2), [(a.step, a.severity.name, a.message[:70]) for a in torch_phase])
    assert torch_phase and torch_phase[0].severity == Severity.HIGH
    assert torch_phase[0].step in measured_after()[: WINDOW + 8], (mode_budget, measured_after())


def test_a_rank_whose_torch_ops_are_slower_than_its_peers_is_named() -> None:
    """Sabotage present from the first step on one rank: its own start-up is the baseline,
    but its peers run the same torch on like machines.  Generated: world size, each
    rank's noise, which ranks are slowed (a minority) and by how much, odd values."""
    from trainguard.monitor import ranks

    rng = seeded()
    for trial in range(200):
        world = rng.randrange(2, 9)
        base = rng.uniform(1.0, 12.0)
        slowed = set(rng.sample(range(world), rng.randrange(0, max(1, (world - 1) // 2) + 1)))
        paces: dict[int, Any] = {}
        for r in range(world):
            slow = rng.uniform(2.2, 6.0) if r in slowed else 1.0  # 2.2 * 0.85 > 1.5 * 1.15
            paces[r] = base * rng.uniform(0.85, 1.15) * slow
        if rng.random() < 0.2:  # a peer that sends nothing usable is left out, not trusted
            paces[rng.randrange(world)] = rng.choice([None, "fast", -1.0, float("nan"), True])
        kept = {r for r, v in paces.items() if isinstance(v, float) and v > 0}
        reports = [
            {
                "rank": r,
                "step": 49,
                "world": world,
                "key": "k",
                "hyperparameters": "h",
                "code": {},
                "shards": {},
                "cover": {},
                "pace": paces[r],
            }
            for r in range(world)
        ]
        verdict = ranks.judge(reports, b"k" * 32)
        named = [f.evidence["ranks"] for f in verdict.findings if f.rule == "TG1307"]
        expected = sorted(slowed & kept) if len(kept) > 1 else []
        print(trial, world, sorted(slowed), named)
        assert named == ([expected] if expected else []), (paces, named)
        assert verdict.reporter not in (expected or [-1])
