"""A check that keeps failing is blind: its TG1315 note turns high (monitor/safety.py).

Making a check raise (a tensor it cannot read, an attribute it trips on) is a way to
blind it, one step at a time: the first failures of a check and phase are medium, from
the ``QUIET_FAILURES + 1``-th in a run on the note is high.  Generated: random
interleavings of failing and passing calls over several checks and phases; each
note's severity follows from the count of failures of its own check and phase alone.
A core check (``Check.core``) is high at its first failure (red team 3, F3).
"""

from __future__ import annotations

from collections import Counter

from tests.seeds import seeded
from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.safety import QUIET_FAILURES, checked


def _fails() -> list[Alert]:
    raise AttributeError("'Tensor' object has no attribute 'grad_fn_'")


def test_a_check_failing_again_and_again_is_high_from_its_third_failure() -> None:
    rng = seeded()
    failures: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    names = [("UpdateCheck", "before_step"), ("UpdateCheck", "after_step"), ("DataCheck", "x")]
    for step in range(rng.randint(20, 60)):
        name, phase = rng.choice(names)
        ctx = Context(step, 0)
        if rng.random() < 0.3:
            assert checked(name, phase, ctx, lambda: [], failures) == []
            continue
        (note,) = checked(name, phase, ctx, _fails, failures)
        seen[f"{name}.{phase}"] += 1
        count = seen[f"{name}.{phase}"]
        assert note.rule == "TG1315" and note.evidence["failures"] == count
        want = Severity.HIGH if count > QUIET_FAILURES else Severity.MEDIUM
        assert note.severity == want, (name, phase, count, note.severity)
        assert ("blind" in note.message) == (count > QUIET_FAILURES)


def test_without_a_run_count_a_failure_is_a_medium_note() -> None:
    (note,) = checked("X", "y", Context(0, 0), _fails)
    assert note.severity == Severity.MEDIUM


def test_a_core_check_is_high_at_its_first_failure() -> None:
    """A core check (``Check.core``: what it fails to see is the step's weights, their
    update, or the code computing it) is high at once; the others as above."""
    from trainguard.monitor.checks.base import Check

    class CoreProbe(Check):
        core = True

    class PlainProbe(Check):
        pass

    rng = seeded()
    failures: Counter[str] = Counter()
    for step in range(rng.randint(5, 20)):
        probe = rng.choice([CoreProbe, PlainProbe])
        (note,) = checked(probe.__name__, "before_step", Context(step, 0), _fails, failures)
        count = failures[f"{probe.__name__}.before_step"]
        high = probe is CoreProbe or count > QUIET_FAILURES
        assert note.severity == (Severity.HIGH if high else Severity.MEDIUM), (probe, count)
        assert ("core check" in note.message) == (probe is CoreProbe)
