"""The training thread sleeps where it used to compute (TG1307, high).

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
check stays off).  Its clocks are references taken at import, like the
guard's own (monitor/clock.py), and on the watched surface.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque

from trainguard.findings import Severity
from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd

_THREAD_TIME = time.thread_time
SCHEDSTAT = "/proc/thread-self/schedstat"
WARMUP = 16  # steps that set the usual blocked time
WINDOW = 10
SUSTAINED = 8  # steps of WINDOW over the usual blocked time
MIN_EXCESS = 0.002  # seconds per step below which blocking is scheduling noise


def _run_delay(fd: int | None = None) -> float | None:
    """Seconds this thread has waited on a run queue (None where the kernel does not say);
    ``fd``: the file already open (re-read from its start: no open per step)."""
    try:
        if fd is not None:
            return int(os.pread(fd, 200, 0).split()[1]) / 1e9
        with open(SCHEDSTAT, "rb") as f:
            return int(f.read(200).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _open() -> int | None:
    try:
        return os.open(SCHEDSTAT, os.O_RDONLY)
    except OSError:
        return None


class SleepCheck(Check):
    def __init__(self, min_stall_seconds: float) -> None:
        self.min_stall_seconds = min_stall_seconds
        self.thread = threading.get_ident()
        # This thread's file, kept open (it names the thread that opened it).
        self._fd = _open()
        self.enabled = _run_delay(self._fd) is not None
        self._usual: tuple[float, float] | None = None  # median and floor, once warmed up
        self._last = self._now()
        self.usual: list[float] = []  # blocked seconds of the first WARMUP steps
        self.walls: list[float] = []
        self.recent: deque[float] = deque(maxlen=WINDOW)  # excess blocked seconds
        self.blocked: float | None = None  # on the last step (for tests and the bench)

    def _now(self) -> tuple[float, float, float]:
        return clock.now(), _THREAD_TIME(), _run_delay(self._fd) or 0.0

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        if not self.enabled or threading.get_ident() != self.thread:
            return []  # another thread's clocks say nothing of this one's steps
        now = self._now()
        wall, cpu, delay = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        self.blocked = blocked = max(0.0, wall - cpu - delay)
        if len(self.usual) < WARMUP:
            self.usual.append(blocked)
            self.walls.append(wall)
            return []
        if self._usual is None:  # the warm-up's steps never change: computed once
            med = statistics.median(self.usual)
            mad = 1.4826 * statistics.median(abs(v - med) for v in self.usual)
            self._usual = med, max(MIN_EXCESS, 8 * mad, 0.25 * statistics.median(self.walls))
        med, floor = self._usual
        self.recent.append(blocked - med if blocked - med > floor else 0.0)
        over = [e for e in self.recent if e > 0]
        if len(over) < SUSTAINED or sum(over) < self.min_stall_seconds:
            return []
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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
