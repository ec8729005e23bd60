"""The training thread sleeps where it used to compute, or torch's ops got slower than
plain code (TG1307, high).

Wall time alone cannot tell an injected sleep from a busy machine: both make a
step slower.  The kernel can: a thread's wall time is the CPU time it ran,
plus the time it was runnable but waiting for a CPU (contention:
``run_delay`` in ``/proc/thread-self/schedstat``), plus the time it was
*blocked*: sleeping, or waiting for I/O or another thread.  So per step
``blocked = wall - cpu - run_delay``.  Contention raises run_delay and leaves
``blocked`` alone; ``time.sleep``, ``Event.wait`` or a lock held elsewhere
raise ``blocked`` and leave CPU and run_delay alone.  Honest loops can block
(data loader workers, I/O, a GPU sync), so the check learns the usual
blocked time over the first ``WARMUP`` steps and reports a *sustained* excess
over it: on ``SUSTAINED`` of the last ``WINDOW`` steps, adding up to at least
``min_stall_seconds``.  Linux only (elsewhere there is no run_delay, and the
sleep rule stays off).  Its clocks are references taken at import, like the
guard's own (monitor/clock.py), and on the watched surface.

A spin (CPU burnt, not a sleep) added to every torch op slows the training and
the guard alike and leaves ``blocked`` alone.  The second rule times a fixed
reference through torch and the same outside it at every step
(monitor/calibration.py): their ratio does not move with contention, and moves
when something intercepts torch's ops.  On every platform.  In budget mode the
reference pair is the schedule's unit ``calibration``: measured at the steps the
schedule draws (every step of the warm-up, which sets the usual ratio), judged over
the last ``WINDOW`` measurements; an interception that stays is found at the
``SUSTAINED``-th drawn step after it began.  The sleep rule's clocks are read at
every step (its window is one of steps).
"""

from __future__ import annotations

import statistics
from collections import deque

from trainguard.findings import Severity
from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.calibration import SUSTAINED as SUSTAINED_CAL
from trainguard.monitor.calibration import WINDOW as WINDOW_CAL
from trainguard.monitor.calibration import Calibration
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.checks.timing import replaced

SCHEDSTAT = clock.SCHEDSTAT
_run_delay = clock.run_delay  # the tests ask it whether the kernel reports run_delay
WARMUP = 16  # steps that set the usual blocked time
WINDOW = 10
SUSTAINED = 8  # steps of WINDOW over the usual blocked time
MIN_EXCESS = 0.002  # seconds per step below which blocking is scheduling noise


class SleepCheck(Check):
    unit = "calibration"  # budget mode: the reference pair at the steps the schedule draws

    def __init__(self, min_stall_seconds: float, others: clock.OtherThreads | None = None) -> None:
        import torch

        self.min_stall_seconds = min_stall_seconds
        self.clock = clock.ThreadClock()
        # The other Python threads' running and CPU-wait seconds per step: the GIL can
        # have held the training thread that long (monitor/clock.py OtherThreads).
        self.others = others or clock.OtherThreads()
        self.usual_others: list[float] = []
        self.contended: deque[float] = deque(maxlen=WINDOW)  # excess, GIL waits too
        self.gil_said = False  # its medium is said once per run
        self.enabled = self.clock.has_delay  # the sleep rule
        self.calibration = Calibration(torch)
        self._usual: tuple[float, float] | None = None  # median and floor, once warmed up
        self.usual: list[float] = []  # blocked seconds of the first WARMUP steps
        self.walls: list[float] = []
        self.recent: deque[float] = deque(maxlen=WINDOW)  # excess blocked seconds
        self.blocked: float | None = None  # on the last step (for tests and the bench)
        # Budget mode (arm): whether the pair is measured at this step and at the next;
        # exact mode never arms: every step.  Its seconds, charged to the unit (outside).
        self._measure, self._measure_next, self._spent = True, True, 0.0
        self.measured: deque[int] = deque(maxlen=1024)  # budget mode: steps measured at

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        lap = self.clock.lap()
        if lap is None:
            return []  # another thread's clocks say nothing of this one's steps
        alerts = replaced(ctx, self.clock)
        if self._measure:
            started = clock.now()
            alerts += self.intercepted(ctx, *self.calibration.measure())
            self._spent += clock.now() - started
            self.measured.append(ctx.step)
        if self.enabled:
            alerts += self.slept(ctx, *lap, others=self.others.at(ctx.step))
        return alerts

    def arm(self, on: bool) -> None:
        """Called at step t's pre-hook with the draw for t+1: t's is the one told before."""
        self._measure, self._measure_next = self._measure_next, on

    def outside_seconds(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    def intercepted(self, ctx: Context, torch_s: float, plain_s: float) -> list[Alert]:
        """The calibration rule, given this step's reference times (tests pass their own)."""
        if self.calibration.profiling():
            return []  # the profiler's per-op time is on purpose
        factor = self.calibration.judge(torch_s, plain_s)
        if factor is None:
            return []
        usual = self.calibration.usual
        return [
            ctx.alert(
                "TG1307",
                f"torch's ops run {factor:.1f}x slower than at start-up relative to the same "
                f"work outside torch, on {SUSTAINED_CAL} of the last {WINDOW_CAL} steps: "
                "something intercepts every op (a dispatch or function mode, a Python kernel "
                "on aten ops, a trace function); contention slows both alike",
                severity=Severity.HIGH,
                phase="torch",
                factor=round(factor, 3),
                usual_ratio=round(usual or 0.0, 3),
            )
        ]

    def slept(
        self, ctx: Context, wall: float, cpu: float, delay: float, others: float = 0.0
    ) -> list[Alert]:
        """The sleep rule, given this step's wall, CPU and run-queue seconds; ``others``:
        the process's other Python threads' running and CPU-wait seconds."""
        self.blocked = blocked = max(0.0, wall - cpu - delay)
        if len(self.usual) < WARMUP:
            self.usual.append(blocked)
            self.walls.append(wall)
            self.usual_others.append(others)
            return []
        if self._usual is None:  # the warm-up's steps never change: computed once
            med = statistics.median(self.usual)
            mad = 1.4826 * statistics.median(abs(v - med) for v in self.usual)
            self._usual = med, max(MIN_EXCESS, 8 * mad, 0.25 * statistics.median(self.walls))
        med, floor = self._usual
        excess = blocked - med
        self.contended.append(excess if excess > floor else 0.0)
        # Waiting for the GIL is blocked time too: on a busy machine its holder waits for
        # a CPU (2 cores, CPU burners, Python threads doing pure-Python work: high on
        # honest runs).  Up to the other threads' time beyond the warm-up's, it is
        # excused from this rule; medium below when only that makes it quiet.
        busy = max(0.0, others - statistics.median(self.usual_others))
        self.recent.append(excess if excess - busy > floor else 0.0)
        over = [e for e in self.recent if e > 0]
        if len(over) < SUSTAINED or sum(over) < self.min_stall_seconds:
            return self._gil(ctx, med)
        self.recent.clear()  # one alert per window of sustained blocking
        return [
            ctx.alert(
                "TG1307",
                f"the training thread was blocked (sleeping or waiting, not computing and not "
                f"waiting for a CPU) {sum(over):.3f}s more than usual over {len(over)} of the "
                f"last {WINDOW} steps (usual {med * 1e3:.1f} ms per step): an injected wait, "
                "not contention",
                severity=Severity.HIGH,
                phase="blocked",
                seconds=round(sum(over), 6),
            )
        ]

    def _gil(self, ctx: Context, med: float) -> list[Alert]:
        """Medium, once: blocked as the rule counts it while other Python threads were as
        busy."""
        over = [e for e in self.contended if e > 0]
        if self.gil_said or len(over) < SUSTAINED or sum(over) < self.min_stall_seconds:
            return []
        self.gil_said = True
        return [
            ctx.alert(
                "TG1307",
                f"the training thread was blocked {sum(over):.3f}s more than usual over "
                f"{len(over)} of the last {WINDOW} steps (usual {med * 1e3:.1f} ms per step) "
                "while the process's other Python threads ran or waited for a CPU as long: "
                "likely waiting for the GIL on a busy machine (contention); a wait beside "
                "busy threads reads the same",
                severity=Severity.MEDIUM,
                phase="blocked",
                seconds=round(sum(over), 6),
            )
        ]

    def close(self) -> None:
        self.clock.close()
