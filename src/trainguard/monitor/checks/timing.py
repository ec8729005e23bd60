"""Steps far slower than this rank's recent ones (TG1307); see monitor/stats.py."""

from __future__ import annotations

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.stats import RobustWindow, is_stall

# A stall is high once this many happened within RECENT_STEPS.
REPEATS_FOR_HIGH = 3
RECENT_STEPS = 50


class StallCheck(Check):
    def __init__(self, times: RobustWindow, min_stall_seconds: float) -> None:
        self.times = times
        self.min_stall = min_stall_seconds
        self._stalls: list[int] = []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        if not is_stall(self.times, end.seconds, min_excess=self.min_stall):
            self.times.add(end.seconds)
            return []
        med, _ = self.times.center_scale()
        self._stalls = [s for s in self._stalls if s > ctx.step - RECENT_STEPS]
        self._stalls.append(ctx.step)
        severity = Severity.HIGH if len(self._stalls) >= REPEATS_FOR_HIGH else Severity.MEDIUM
        return [
            ctx.alert(
                "TG1307",
                f"step took {end.seconds:.3f}s, usual {med:.3f}s "
                f"({len(self._stalls)} such steps in the last {RECENT_STEPS})",
                severity=severity,
                seconds=end.seconds,
                median=med,
                recent=len(self._stalls),
            )
        ]
