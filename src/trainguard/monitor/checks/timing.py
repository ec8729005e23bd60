"""Step time (TG1307): stalls, and slowdowns confined to one phase of the step.

Each step is split into phases: ``compute`` (data wait, forward, backward and
the loop's own code: from the end of the last step to the optimizer's step),
``optimizer`` (the optimizer's own work between its step hooks) and ``guard``
(trainguard's own time).  Two findings:

* a stall: a step far slower than this rank's recent ones (robust statistics,
  monitor/stats.py), attributed to the phase with the largest excess.  Medium;
  high once stalls keep landing in one phase more often than chance allows: a
  paused process (contention) lands in a phase in proportion to its share of
  the step, so ``REPEATS_FOR_HIGH`` stalls in a phase with share ``s`` are high
  only when ``s ** n < CHANCE``;
* a sustained slowdown: a phase that runs at ``SLOWER`` times its start-up
  median on nearly all of the last ``LATEST`` steps while the other phases do
  not (contention slows every phase alike), its excess over the last
  ``SUSTAIN`` steps adding up to at least ``min_stall_seconds``.  This catches
  small sleeps on every step that never make one step look like a stall.  High.
"""

from __future__ import annotations

import statistics
from collections import deque

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.stats import RobustWindow, is_stall

REPEATS_FOR_HIGH = 3
RECENT_STEPS = 50
CHANCE = 0.01
SLOWER = 1.75
SUSTAIN = 50
LATEST = 10  # of which SUSTAIN_SHARE must be slow (the excess is summed over SUSTAIN)
SUSTAIN_SHARE = 0.9
BASELINE_STEPS = 24  # steps after the first whose medians are each phase's baseline
JUDGED = ("compute", "optimizer")  # the guard's own time varies by design (full checks)


class StallCheck(Check):
    def __init__(self, times: RobustWindow, min_stall_seconds: float) -> None:
        self.times = times
        self.min_stall = min_stall_seconds
        self._stalls: list[tuple[int, str]] = []
        self._early: dict[str, list[float]] = {}
        self.baseline: dict[str, float] | None = None
        self._recent: dict[str, deque[float]] = {p: deque(maxlen=SUSTAIN) for p in JUDGED}
        self._reported: set[str] = set()

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        phases = end.phases or {"compute": end.seconds}
        alerts = []
        if is_stall(self.times, end.seconds, min_excess=self.min_stall):
            alerts.append(self._stall(ctx, end, phases))
        else:
            self.times.add(end.seconds)
        if self.baseline is None:
            if ctx.step >= 1:  # step 0 sets up optimizer state
                for p, t in phases.items():
                    self._early.setdefault(p, []).append(t)
            if ctx.step >= BASELINE_STEPS:
                self.baseline = {p: statistics.median(v) for p, v in self._early.items()}
            return alerts
        return alerts + self._sustained(ctx, phases)

    def _share(self, phase: str) -> float:
        if not self.baseline:
            return 1.0
        total = sum(self.baseline.values())
        return self.baseline.get(phase, 0.0) / total if total > 0 else 1.0

    def _stall(self, ctx: Context, end: StepEnd, phases: dict[str, float]) -> Alert:
        med, _ = self.times.center_scale()
        base = self.baseline or {}
        excess = {p: t - base.get(p, 0.0) for p, t in phases.items()}
        phase = max(excess, key=lambda p: excess[p])
        self._stalls = [(s, p) for s, p in self._stalls if s > ctx.step - RECENT_STEPS]
        self._stalls.append((ctx.step, phase))
        same = sum(1 for _, p in self._stalls if p == phase)
        high = same >= REPEATS_FOR_HIGH and self._share(phase) ** same < CHANCE
        return ctx.alert(
            "TG1307",
            f"step took {end.seconds:.3f}s, usual {med:.3f}s, the excess in the {phase} phase "
            f"({same} such steps there in the last {RECENT_STEPS})",
            severity=Severity.HIGH if high else Severity.MEDIUM,
            seconds=end.seconds,
            median=med,
            recent=len(self._stalls),
            phase=phase,
            phases={p: round(t, 6) for p, t in phases.items()},
        )

    def _sustained(self, ctx: Context, phases: dict[str, float]) -> list[Alert]:
        assert self.baseline is not None
        ratios = {
            p: phases[p] / self.baseline[p]
            for p in phases
            if p in self.baseline and self.baseline[p] > 0
        }
        alerts = []
        for p in JUDGED:
            if p not in ratios:
                continue
            others = [r for q, r in ratios.items() if q != p]
            contention = max([1.0, *others])
            self._recent[p].append(phases[p] - self.baseline[p] * contention)
            limit = (SLOWER - 1) * self.baseline[p]
            slow = [e for e in self._recent[p] if e > limit]
            latest = sum(1 for e in list(self._recent[p])[-LATEST:] if e > limit)
            if (
                p not in self._reported
                and latest >= SUSTAIN_SHARE * LATEST
                and sum(slow) >= self.min_stall
            ):
                self._reported.add(p)  # once per run and phase; stalls keep reporting
                alerts.append(
                    ctx.alert(
                        "TG1307",
                        f"the {p} phase has run at over {SLOWER}x its usual time on {len(slow)} "
                        f"of the last {len(self._recent[p])} steps (+{sum(slow):.3f}s) while "
                        "the others did not: a slowdown confined to it, not contention",
                        severity=Severity.HIGH,
                        phase=p,
                        excess_seconds=round(sum(slow), 6),
                        baseline_seconds=round(self.baseline[p], 6),
                    )
                )
        return alerts
