"""The process takes CPU away from its own training and calls it contention (TG1320).

The time checks excuse a step's wait for a CPU (``run_delay``, monitor/clock.py) as a
busy machine: another job's load is nobody's sabotage.  Red team A10 made that load
itself: the training thread reniced to 19, pinned to one CPU, and a forked child
spinning on that CPU made every step ~20x slower, reported only as medium contention.

The invariant: what the process controls about its own scheduling does not change
while it trains.  Recorded when ``watch()`` starts and compared at every step's
pre-hook and end (syscalls and preads of files kept open, through functions captured
at import, like the guard's clocks):

* the training thread's nice value, scheduling policy and CPU affinity (at both);
* every ``PROCESS_EVERY`` steps' end, the nice value and policy of the process's
  other threads (a few per round, in turn: torch's intra-op threads are the work
  too), the autogroup's nice value, the cgroup the process is in and that cgroup's
  CPU limits (v2 ``cpu.max``, ``cpu.weight``; v1 ``cpu.cfs_quota_us``,
  ``cpu.shares``), where readable.

A change that takes CPU from training (a higher nice value, ``SCHED_BATCH`` or
``SCHED_IDLE`` or leaving a real-time policy, a CPU set missing a CPU it had, another
cgroup, a tighter quota or a lower weight) is high; one that gives CPU is low.  Either
way the new value is the reference from then on.  Contention the process did not make
(another job) changes none of these and stays the stall check's medium.

Not judged: the process's children and threads as such.  A DataLoader's workers and
torch.compile's compile workers are children that burn CPU honestly, a background
evaluation process too; the alert's evidence counts them.  A change made from outside
(an administrator's ``renice``, a container's CPU limit resized) reads the same as one
the process made: the message names the value before and after.  An OpenMP runtime
told to bind its threads (``OMP_PROC_BIND``, ``GOMP_CPU_AFFINITY``, ``KMP_AFFINITY``)
pins the training thread at its first parallel region: a CPU set narrowed during the
first step with one of those set is medium.  A setting flipped and put back between
two of the comparisons (inside one phase of a step) is not seen.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd

THREADS_PER_STEP = 8  # other threads' nice and policy read per round, in turn
PROCESS_EVERY = 4  # steps between two rounds of the process-wide reads (cgroup, threads)
BINDING_ENV = ("OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PLACES")
# Policies ordered by what they give the thread: idle < batch < normal < real time.
_POLICY_RANK = {
    getattr(os, "SCHED_IDLE", 5): 0,
    getattr(os, "SCHED_BATCH", 3): 1,
    getattr(os, "SCHED_OTHER", 0): 2,
}
_POLICY_NAMES = {
    getattr(os, n): n
    for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
    if hasattr(os, n)
}
_PRIO_PROCESS = getattr(os, "PRIO_PROCESS", 0)
_LISTDIR = os.listdir  # captured at import, like the reads in monitor/clock.py
_ISDIR = os.path.isdir
# cgroup files whose number is a share of CPU (more is more CPU); cpu.max and
# cpu.cfs_quota_us are a quota (compared as CPUs' worth, "max" or -1 unlimited).
_WEIGHTS = ("cpu.weight", "cpu.shares")
_QUOTAS = ("cpu.max", "cpu.cfs_quota_us")


def _policy_rank(policy: int) -> int:
    return _POLICY_RANK.get(policy, 3)  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE: real time


def thread_settings(tid: int = 0) -> dict[str, Any]:
    """A thread's nice value, policy and CPU set (0: the calling thread); a setting the
    platform does not report is left out."""
    out: dict[str, Any] = {}
    for name, fn, args in (
        ("nice", clock.GETPRIORITY, (_PRIO_PROCESS, tid)),
        ("policy", clock.GETSCHEDULER, (tid,)),
        ("cpus", clock.GETAFFINITY, (tid,)),
    ):
        if fn is None:
            continue
        try:
            value = fn(*args)
        except OSError:  # the thread ended, or the call is refused here
            continue
        out[name] = frozenset(value) if name == "cpus" else value
    return out


def cgroup_files() -> dict[str, str]:
    """The process's cgroup membership and CPU limit files that can be read, by name."""
    files = {"cgroup": "/proc/self/cgroup", "autogroup": "/proc/self/autogroup"}
    fd = clock.open_read("/proc/self/cgroup")
    if fd is None:
        return files
    try:
        lines = clock.read_at(fd).decode(errors="replace").splitlines()
    except OSError:
        lines = []
    finally:
        clock.close_fd(fd)
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2 (unified)
            for name in ("cpu.max", "cpu.weight"):
                files[name] = f"/sys/fs/cgroup{path.rstrip('/')}/{name}"
        elif "cpu" in controllers.split(","):  # v1: mounted as cpu or cpu,cpuacct
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                folder = f"/sys/fs/cgroup/{mount}{path.rstrip('/')}"
                if _ISDIR(folder):
                    for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"):
                        files[name] = f"{folder}/{name}"
                    break
    return files


def _number(name: str, text: str) -> float | None:
    """A limit's CPU in comparable units (larger gives more CPU); None if unreadable."""
    words = text.split()
    try:
        if name == "cpu.max":  # "max 100000" or "50000 100000"
            return float("inf") if words[0] == "max" else float(words[0]) / float(words[1])
        if name == "cpu.cfs_quota_us":
            return float("inf") if float(words[0]) < 0 else float(words[0])
        if name == "autogroup":  # "/autogroup-12 nice 0": a higher nice gives less
            return -float(words[-1])
        return float(words[0])
    except (IndexError, ValueError, ZeroDivisionError):
        return None


def lowered(name: str, before: Any, now: Any) -> bool | None:
    """Whether a change from ``before`` to ``now`` takes CPU from training (None: it
    cannot be told, which counts as taking)."""
    if name == "nice":
        return bool(now > before)
    if name == "policy":
        return _policy_rank(now) < _policy_rank(before)
    if name == "cpus":
        return not now >= before
    if name == "cgroup":
        return True  # another cgroup: its limits are not the ones the run started under
    if name == "cpu.cfs_period_us":
        return bool(float(now or 0) > float(before or 0))  # the same quota per longer period
    a, b = _number(name, str(before)), _number(name, str(now))
    if a is None or b is None:
        return None
    return b < a


class SchedulingCheck(Check):
    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.own = thread_settings()
        self.binding = [k for k in BINDING_ENV if os.environ.get(k)]  # as watch() began
        self.kept: dict[str, clock.Kept] = {}
        self.files: dict[str, str] = {}
        for name, path in cgroup_files().items():
            kept = clock.Kept(path)
            text = self._read(kept)
            if text is None:
                kept.close()
                continue
            self.kept[name], self.files[name] = kept, text
        # A thread started since watch() began inherits its creator's settings: judged
        # against the process's as they were then.
        self.process = thread_settings(os.getpid())
        self.threads = {t: _nice_policy(t) for t in _tids()}  # per other thread: last seen
        self._turn = 0
        self._steps = 0

    @staticmethod
    def _read(kept: clock.Kept) -> str | None:
        data = kept.read()
        if kept.replaced:  # its number made to name another file (monitor/clock.py)
            return f"<{kept.path} replaced>"
        return data.decode(errors="replace").strip() if data is not None else None

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._own(ctx)

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        alerts = self._own(ctx)
        self._steps += 1
        if self._steps % PROCESS_EVERY:
            return alerts  # the process-wide reads cost ~20 us: every few steps
        for name, kept in self.kept.items():
            text = self._read(kept)
            if text is not None and text != self.files[name]:
                alerts.append(
                    self._changed(ctx, "the process's " + name, name, self.files[name], text)
                )
                self.files[name] = text
        return alerts + self._others(ctx)

    def _own(self, ctx: Context) -> list[Alert]:
        if threading.get_ident() != self.thread:
            return []  # another thread's settings are judged with the others
        now = thread_settings()
        if now == self.own:
            return []
        alerts = []
        for name in sorted(set(now) & set(self.own)):
            if now[name] != self.own[name]:
                alerts.append(
                    self._changed(
                        ctx, "the training thread's " + name, name, self.own[name], now[name]
                    )
                )
        self.own = now
        return alerts

    def _others(self, ctx: Context) -> list[Alert]:
        """A few of the process's other threads per step: nice value and policy (their
        CPU sets are the OpenMP runtime's to bind)."""
        tids = _tids()
        self.threads = {t: v for t, v in self.threads.items() if t in tids}
        if not tids:
            return []
        alerts = []
        for i in range(min(THREADS_PER_STEP, len(tids))):
            tid = tids[(self._turn + i) % len(tids)]
            now = _nice_policy(tid)
            before = self.threads.get(tid, {k: self.process[k] for k in now if k in self.process})
            for name in sorted(set(now) & set(before)):
                if now[name] != before[name]:
                    what = f"thread {tid}'s {name}"
                    alerts.append(self._changed(ctx, what, name, before[name], now[name]))
            self.threads[tid] = now
        self._turn += THREADS_PER_STEP
        return alerts

    def _changed(self, ctx: Context, what: str, name: str, before: Any, now: Any) -> Alert:
        takes = lowered(name, before, now)
        was, new = (_shown(name, v) for v in (before, now))
        if takes is False:
            severity, why = Severity.LOW, "gives training more CPU"
        elif name == "cpus" and ctx.step == 0 and self.binding:
            severity = Severity.MEDIUM
            why = f"during the first step with {', '.join(self.binding)} set (OpenMP binding)"
        else:
            severity = Severity.HIGH
            why = (
                "takes CPU from training: the process slows itself, and its steps' wait "
                "for a CPU is no busy machine (or someone outside changed it)"
            )
        return ctx.alert(
            "TG1320",
            f"{what} changed from {was} to {new} since watch() started: {why}",
            severity=severity,
            key=what,  # the sink groups repeats by it: each setting is its own finding
            before=was,
            now=new,
            children=_children(),
        )

    def close(self) -> None:
        for kept in self.kept.values():
            kept.close()


def _shown(name: str, value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if name == "policy":
        return _POLICY_NAMES.get(value, value)
    return value


def _tids() -> list[int]:
    """The process's threads but the calling one."""
    try:
        tids = sorted(int(t) for t in _LISTDIR("/proc/self/task"))
    except (OSError, ValueError):
        return []
    me = threading.get_native_id()
    return [t for t in tids if t != me]


def _nice_policy(tid: int) -> dict[str, Any]:
    return {k: v for k, v in thread_settings(tid).items() if k != "cpus"}


def _children() -> int | None:
    """How many child processes the calling thread has (evidence only)."""
    fd = clock.open_read("/proc/thread-self/children")
    if fd is None:
        return None
    try:
        return len(clock.read_at(fd, 65536).split())
    except OSError:
        return None
    finally:
        clock.close_fd(fd)
