"""Step time (TG1307): stalls, and slowdowns confined to one phase of the step.

Each step is split into phases: ``compute`` (data wait, forward, backward and
the loop's own code: from the end of the last step to the optimizer's step),
``optimizer`` (the optimizer's own work between its step hooks) and ``guard``
(trainguard's own time).  Two findings:

* a stall: a step far slower than this rank's recent ones (robust statistics,
  monitor/stats.py), attributed to the phase with the largest excess.  Medium;
  high once stalls keep landing in one phase more often than chance allows: a
  paused process lands in a phase in proportion to its share of the step, so of
  ``N`` recent stalls, ``k >= REPEATS_FOR_HIGH`` in a phase with share ``s`` are
  high only when a binomial(N, s) draw reaches ``k`` with probability under
  ``CHANCE``.  A step whose excess is the time the thread waited for a CPU
  (``run_delay``, monitor/clock.py: the machine is busy) is no stall of a
  phase: it is reported as contention (medium, at most once per
  ``RECENT_STEPS``) and counts towards the usual step time;
* a sustained slowdown: a phase that runs at ``SLOWER`` times its start-up
  median on nearly all of the last ``LATEST`` steps while the other phases do
  not (contention slows every phase alike), its excess over the last
  ``SUSTAIN`` steps adding up to at least ``min_stall_seconds``; a step's
  wait for a CPU beyond the usual is taken off first (it may have fallen in
  any phase).  This catches small sleeps on every step that never make one
  step look like a stall.  High;
* the guard's own phase blocked: its CPU time is its own work (full checks at some
  steps, budget mode's draws: not judged), and so is its wait for a CPU (contention);
  the rest of its wall time (asleep, waiting on I/O, a lock, the GIL), less its waits
  by design (ledger appends, the ranks' comparison: monitor/clock.py ``OffCpu``), is
  not.  Judged like the phases above against its own start-up median: an excess over
  the larger of ``GUARD_FLOOR``, ``SLOWER - 1`` times that median and eight times its
  spread, on nearly all of the last ``LATEST`` steps, adding up to
  ``min_stall_seconds``.  What blocks the rest of the step too (another Python thread
  holding the GIL) blocks the guard alike: the rest's excess, in proportion to the
  guard's usual share of the step, is excused; so is, up to the other Python threads'
  time running or waiting for a CPU beyond start-up's, a wait for the GIL (its holder
  waiting for a CPU on a busy machine: medium, once, when only that keeps it quiet);
  the guard's blocked seconds never count above the whole step's.  Red team A11c slept in
  ``guard.step``, where no phase was judged, sized under the stall rule: 2.2-2.7x
  slower steps.  High.

Steps of different kinds are judged apart (``StepEnd.kind``): when the first
optimizer steps several times per ``guard.step`` (a WGAN's critic listed first),
the steps its own next step ends hold one critic step each, the one ``guard.step``
ends holds the other optimizers' work too.  Judged together, that longer step was a
stall every few steps, and high (red team 2, #9).  Each kind has its own window,
baseline and stalls; the guard's window (its median feeds the budget schedule and the
watchdog) gets every step that was no stall, of every kind.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from itertools import islice

from trainguard.findings import Severity
from trainguard.monitor import clock
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
GUARD_FLOOR = 0.002  # seconds blocked per step inside the guard that are scheduling noise


def replaced(ctx: Context, thread: clock.ThreadClock) -> list[Alert]:
    """The alert, once, when the clock's kept-open schedstat file was made to name another
    (monitor/clock.py ``Kept``): from then on it excuses no wait for a CPU."""
    if not thread.replaced or thread.reported:
        return []
    thread.reported = True
    return [
        ctx.alert(
            "TG1307",
            f"the file the guard reads this thread's wait for a CPU from ({thread.path}, "
            "kept open since start-up) now names another file: its number was reused "
            "(os.dup2) to fake that wait; no wait is excused as contention from now on",
            severity=Severity.HIGH,
            phase="clock",
        )
    ]


def chance_of(k: int, n: int, share: float) -> float:
    """P(X >= k) for X ~ binomial(n, share): k of n stalls in a phase by chance alone."""
    share = min(max(share, 0.0), 1.0)
    return sum(math.comb(n, i) * share**i * (1 - share) ** (n - i) for i in range(k, n + 1))


class StallCheck(Check):
    def __init__(
        self,
        times: RobustWindow,
        min_stall_seconds: float,
        thread: clock.ThreadClock | None = None,
        others: clock.OtherThreads | None = None,
    ) -> None:
        # ``times``: the guard's window, every step that was no stall (its median feeds the
        # budget schedule and the watchdog); judged against a window of this kind's own.
        self.shared = times
        self.times = RobustWindow(times.values.maxlen or 64, times.warmup, times.refresh)
        # This thread's run-queue time per step (0.0 where the kernel does not say).
        self.clock = thread or clock.ThreadClock()
        # The other Python threads' seconds running or waiting for a CPU per step: what
        # the GIL can have held the guard's phase for (monitor/clock.py OtherThreads).
        self.others = others or clock.OtherThreads()
        self.others_busy = self.base_others = 0.0  # this step's; the start-up median
        self._early_others: list[float] = []
        self.delays = RobustWindow(times.values.maxlen or 64, 1, times.refresh)
        self._contention_at: int | None = None  # the step of the last contention report
        self._early_delays: list[float] = []
        self.base_delay = 0.0
        self.min_stall = min_stall_seconds
        self._stalls: list[tuple[int, str]] = []
        self._early: dict[str, list[float]] = {}
        self.baseline: dict[str, float] | None = None
        self._recent: dict[str, deque[float]] = {p: deque(maxlen=SUSTAIN) for p in JUDGED}
        self._recent["guard"] = deque(maxlen=SUSTAIN)  # the guard's time off CPU, excess
        self._contended: deque[float] = deque(maxlen=SUSTAIN)  # the same, GIL waits too
        self._early_blocked: list[tuple[float, float]] = []  # the guard's, the rest's
        self.base_rest = 0.0  # the rest of the step's usual seconds blocked
        self.blocked = 0.0  # the step being judged: its seconds blocked, all phases
        self.base_blocked = 0.0  # the guard's usual seconds blocked per step
        self.blocked_limit = GUARD_FLOOR  # an excess over it counts (set with the baseline)
        self._reported: set[str] = set()
        self._kinds: dict[str, StallCheck] = {}  # the judge of each further kind of step
        self.stalled = False  # whether the last step judged was a stall

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        lap = self.clock.lap()
        found = replaced(ctx, self.clock)
        judge = self
        if end.kind:
            if end.kind not in self._kinds:
                window = RobustWindow(
                    self.times.values.maxlen or 64, self.times.warmup, self.times.refresh
                )
                self._kinds[end.kind] = StallCheck(window, self.min_stall, self.clock, self.others)
            judge = self._kinds[end.kind]
        # The whole step's seconds blocked (asleep or waiting), for the guard phase's rule.
        judge.blocked = max(0.0, lap[0] - lap[1] - lap[2]) if lap is not None else 0.0
        judge.others_busy = self.others.at(ctx.step)
        alerts = judge.judge(ctx, end, lap[2] if lap is not None else 0.0)
        if not judge.stalled:  # the usual step time, whatever its kind
            self.shared.add(end.seconds)
        return found + alerts

    def waited(self, delay: float) -> float:
        """Seconds this step waited for a CPU beyond the usual (0 before any is known)."""
        if not self.delays.values:
            return 0.0
        return max(0.0, delay - self.delays.median())

    def judge(self, ctx: Context, end: StepEnd, delay: float) -> list[Alert]:
        """The step's findings given its run-queue seconds ``delay`` (tests pass their own;
        ``self.blocked``: the step's seconds blocked, set by step_end)."""
        blocked = self.blocked
        # The guard's spans lie inside the step, so their time blocked cannot exceed the
        # step's.  Read over a span of a few ms, the wait for a CPU is not always where
        # it happened: on a busy machine (2 cores, a Python thread beside) spans read
        # 10-20 ms blocked with no run-queue delay while the whole step, the same
        # file read at its ends, had none blocked (its delay was all of wall minus CPU):
        # the guard phase was high on honest runs.  A sleep is blocked time in both.
        guard_blocked = min(end.guard_blocked, blocked)
        phases = end.phases or {"compute": end.seconds}
        alerts = []
        waited = self.waited(delay)
        self.stalled = False
        if not is_stall(self.times, end.seconds, min_excess=self.min_stall):
            self.times.add(end.seconds)
            self.delays.add(delay)
        elif not is_stall(self.times, end.seconds - waited, min_excess=self.min_stall):
            alerts += self._contention(ctx, end, waited)
            self.times.add(end.seconds)  # a busy machine is the usual now
            self.delays.add(delay)
        else:
            self.stalled = True
            alerts.append(self._stall(ctx, end, phases))
        if self.baseline is None:
            if ctx.step >= 1:  # step 0 sets up optimizer state
                for p, t in phases.items():
                    self._early.setdefault(p, []).append(t)
                self._early_delays.append(delay)
                self._early_blocked.append((guard_blocked, blocked - guard_blocked))
                self._early_others.append(self.others_busy)
            if ctx.step >= BASELINE_STEPS:
                self.baseline = {p: statistics.median(v) for p, v in self._early.items()}
                self.base_delay = statistics.median(self._early_delays or [0.0])
                early = [g for g, _ in self._early_blocked] or [0.0]
                self.base_rest = statistics.median([r for _, r in self._early_blocked] or [0.0])
                self.base_blocked = med = statistics.median(early)
                self.base_others = statistics.median(self._early_others or [0.0])
                spread = 1.4826 * statistics.median(abs(v - med) for v in early)
                self.blocked_limit = max(GUARD_FLOOR, (SLOWER - 1) * med, 8 * spread)
            return alerts
        # Against the start-up baseline, as the phases are: the CPU wait beyond that one.
        waited = max(0.0, delay - self.base_delay)
        alerts += self._sustained(ctx, phases, waited)
        return alerts + self._guard(ctx, guard_blocked, blocked)

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
        chance = chance_of(same, len(self._stalls), self._share(phase))
        high = same >= REPEATS_FOR_HIGH and chance < CHANCE
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

    def _contention(self, ctx: Context, end: StepEnd, waited: float) -> list[Alert]:
        if self._contention_at is not None and ctx.step - self._contention_at < RECENT_STEPS:
            return []
        self._contention_at = ctx.step
        med, _ = self.times.center_scale()
        return [
            ctx.alert(
                "TG1307",
                f"step took {end.seconds:.3f}s, usual {med:.3f}s, of which {waited:.3f}s more "
                "than usual waiting for a CPU: the machine is busy (contention, not reported "
                f"again for {RECENT_STEPS} steps)",
                severity=Severity.MEDIUM,
                seconds=end.seconds,
                median=med,
                phase="contention",
                run_delay_excess=round(waited, 6),
            )
        ]

    def _sustained(self, ctx: Context, phases: dict[str, float], waited: float) -> list[Alert]:
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
            self._recent[p].append(phases[p] - self.baseline[p] * contention - waited)
            limit = (SLOWER - 1) * self.baseline[p]
            if p in self._reported:
                continue
            # The last LATEST first: nearly always too few, and the sum is not needed.
            latest = sum(1 for e in islice(reversed(self._recent[p]), LATEST) if e > limit)
            if latest < SUSTAIN_SHARE * LATEST:
                continue
            slow = [e for e in self._recent[p] if e > limit]
            if sum(slow) >= self.min_stall:
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

    def _guard(self, ctx: Context, guard_blocked: float, blocked: float) -> list[Alert]:
        """The guard's phase: its time blocked beyond the usual (module docstring);
        ``guard_blocked``: its seconds blocked this step, ``blocked``: the whole step's."""
        assert self.baseline is not None
        usual = self.baseline.get("guard")
        if usual is None or "guard" in self._reported:
            return []
        # The rest of the step's blocking beyond its usual, the guard's share of it.
        rest = max(0.0, blocked - guard_blocked - self.base_rest)
        others = sum(self.baseline.get(p, 0.0) for p in JUDGED)
        alike = rest * usual / others if others > 0 else rest
        excess = guard_blocked - self.base_blocked - alike
        self._contended.append(excess if excess > self.blocked_limit else 0.0)
        # What the other Python threads ran or waited for a CPU may all have been the
        # GIL held away from the guard: off CPU, not on a run queue, yet contention.
        # Measured (2 cores, 4 CPU burners, 3 threads doing pure-Python work): the guard
        # read 10-50 ms blocked per step, those threads 0.3-2.4 s busy.  A sleep holds
        # no GIL: it stays high unless other threads were as busy (then medium below).
        unexcused = excess - max(0.0, self.others_busy - self.base_others)
        recent = self._recent["guard"]
        recent.append(excess if unexcused > self.blocked_limit else 0.0)
        if not _sustained(recent, self.min_stall):
            return self._gil(ctx, usual)
        self._reported.add("guard")
        slow = [e for e in recent if e > 0]
        return [
            ctx.alert(
                "TG1307",
                "the guard's own phase was blocked (asleep or waiting, not its checks' work "
                "and not waiting for a CPU) "
                f"{sum(slow):.3f}s more than usual on {len(slow)} of the last {len(recent)} "
                f"steps (usual {self.base_blocked * 1e3:.1f} ms per step, the guard's usual "
                f"time {usual * 1e3:.1f} ms): a wait placed inside guard.step, not contention",
                severity=Severity.HIGH,
                phase="guard",
                excess_seconds=round(sum(slow), 6),
                baseline_seconds=round(self.base_blocked, 6),
            )
        ]

    def _gil(self, ctx: Context, usual: float) -> list[Alert]:
        """Medium, once: the guard's phase blocked as the rule above counts it, on steps
        where the process's other Python threads ran or waited for a CPU as long."""
        if "guard-gil" in self._reported or not _sustained(self._contended, self.min_stall):
            return []
        self._reported.add("guard-gil")
        slow = [e for e in self._contended if e > 0]
        return [
            ctx.alert(
                "TG1307",
                "the guard's own phase was blocked (not its checks' work, not waiting for a "
                f"CPU) {sum(slow):.3f}s more than usual on {len(slow)} of the last "
                f"{len(self._contended)} steps (the guard's usual time {usual * 1e3:.1f} ms), "
                "while the process's other Python threads ran or waited for a CPU as long: "
                "likely waiting for the GIL on a busy machine (contention); a wait placed "
                "inside guard.step beside busy threads reads the same",
                severity=Severity.MEDIUM,
                phase="guard",
                excess_seconds=round(sum(slow), 6),
                baseline_seconds=round(self.base_blocked, 6),
            )
        ]

    def close(self) -> None:
        self.clock.close()


def _sustained(recent: deque[float], min_stall: float) -> bool:
    """Nearly all of the last ``LATEST`` steps over, adding up to ``min_stall``."""
    latest = sum(1 for e in islice(reversed(recent), LATEST) if e > 0)
    return latest >= SUSTAIN_SHARE * LATEST and sum(e for e in recent if e > 0) >= min_stall
