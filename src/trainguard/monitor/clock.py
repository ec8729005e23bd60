"""The guard's clock: references to the time functions taken when trainguard is imported.

Code that patches ``time.perf_counter`` (to hide a sleep, or to make every
step look equally fast in the ledger), or ``os.pread`` (to fake the run-queue
delay read below), after this module is imported does not change what the
guard reads.  :func:`patched` says whether the module-level
functions still are the ones captured here, so a guard reports the patch
(TG1304) instead of silently trusting or distrusting it.

:class:`ThreadClock` splits this thread's wall time into what the kernel says
it was doing: running (CPU time), runnable but waiting for a CPU (``run_delay``
in ``/proc/thread-self/schedstat``: contention) and the rest (blocked: asleep,
waiting on I/O, a lock or another thread).  The time checks use it to tell a
busy machine from time spent on purpose.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

# Captured once, at import: the guard never looks these names up again.
_PERF_COUNTER = time.perf_counter
_MONOTONIC = time.monotonic
_THREAD_TIME = time.thread_time
# The OS reads behind run_delay (red team 2026-12-05 A11b: ``os.pread`` wrapped to report
# slept nanoseconds as run-queue delay made a 3.7x slower step look like contention).
_PREAD = os.pread
_OPEN = os.open
_CLOSE = os.close
# What the process set about its own scheduling (checks/scheduling.py; red team A10: a
# wrapped os.sched_getaffinity would report the CPU set watch() started with).  Linux and
# most Unixes; None where the platform has none.
GETPRIORITY = getattr(os, "getpriority", None)
GETSCHEDULER = getattr(os, "sched_getscheduler", None)
GETAFFINITY = getattr(os, "sched_getaffinity", None)
_CAPTURED = {
    "time.perf_counter": _PERF_COUNTER,
    "time.monotonic": _MONOTONIC,
    "time.thread_time": _THREAD_TIME,
    "os.pread": _PREAD,
    "os.open": _OPEN,
    "os.close": _CLOSE,
    **{
        f"os.{fn.__name__}": fn for fn in (GETPRIORITY, GETSCHEDULER, GETAFFINITY) if fn is not None
    },
}
_MODULES = {"time": time, "os": os}
SCHEDSTAT = "/proc/thread-self/schedstat"


def now() -> float:
    """Seconds from the performance counter captured at import."""
    return _PERF_COUNTER()


def thread_cpu() -> float:
    """This thread's CPU seconds, from the clock captured at import."""
    return _THREAD_TIME()


def patched() -> list[str]:
    """The time and OS functions whose module attribute is no longer the one captured at
    import (the guard goes on using the captured ones)."""
    return [
        name
        for name, fn in _CAPTURED.items()
        if getattr(_MODULES[name.split(".")[0]], name.split(".")[1], None) is not fn
    ]


def read_at(fd: int, size: int = 4096) -> bytes:
    """A kept-open file's content from its start (a /proc or cgroup file is generated anew
    at each read), through the read captured at import."""
    return _PREAD(fd, size, 0)


def open_read(path: str) -> int | None:
    """``path`` opened for reading with the open captured at import; None if it cannot be."""
    try:
        return _OPEN(path, os.O_RDONLY)
    except OSError:
        return None


def close_fd(fd: int) -> None:
    _CLOSE(fd)


def run_delay(fd: int | None = None) -> float | None:
    """Seconds this thread has waited on a run queue (None where the kernel does not say);
    ``fd``: the file already open (re-read from its start: no open per step)."""
    try:
        if fd is not None:
            return int(_PREAD(fd, 200, 0).split()[1]) / 1e9
        fd = _OPEN(SCHEDSTAT, os.O_RDONLY)
        try:
            return int(_PREAD(fd, 200, 0).split()[1]) / 1e9
        finally:
            _CLOSE(fd)
    except (OSError, ValueError, IndexError):
        return None


class ThreadClock:
    """Per-interval wall, CPU and run-queue seconds of the thread that created it.

    ``lap()`` returns the three for the time since the last lap (``delay`` is 0.0
    where the kernel does not report it: ``has_delay`` is then False).  Another
    thread's laps say nothing of this one: they return None.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        try:  # this thread's file, kept open (it names the thread that opened it)
            self._fd: int | None = _OPEN(SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self._fd = None
        self.has_delay = run_delay(self._fd) is not None
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        return _PERF_COUNTER(), _THREAD_TIME(), (run_delay(self._fd) or 0.0)

    def lap(self) -> tuple[float, float, float] | None:
        if threading.get_ident() != self.thread:
            return None
        now = self._read()
        wall, cpu, delay = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        return wall, cpu, delay

    def close(self) -> None:
        if self._fd is not None:
            _CLOSE(self._fd)
            self._fd = None


class OffCpu:
    """Seconds the thread that made it was blocked (wall minus its CPU time minus its
    wait for a CPU: asleep, or waiting on I/O, a lock or another thread) inside the spans
    marked with ``begin``/``end``, summed until ``take``.  The guard's own phase is judged
    by it (checks/timing.py): its CPU time is its own work, and a busy machine is not
    blocking.  A span in another thread counts nothing (the file names this thread)."""

    __slots__ = ("__weakref__", "_fd", "_thread", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self._thread = threading.get_ident()
        try:
            self._fd: int | None = _OPEN(SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self._fd = None
        if self._fd is not None:  # closed with the guard that holds it, whenever that is
            weakref.finalize(self, _CLOSE, self._fd)

    def begin(self) -> tuple[float, float, float]:
        if threading.get_ident() != self._thread:
            return (0.0, 0.0, -1.0)
        return _PERF_COUNTER(), _THREAD_TIME(), (run_delay(self._fd) or 0.0)

    def end(self, mark: tuple[float, float, float]) -> None:
        if mark[2] < 0 or threading.get_ident() != self._thread:
            return
        wall, cpu, delay = _PERF_COUNTER(), _THREAD_TIME(), (run_delay(self._fd) or 0.0)
        self.total += max(0.0, (wall - mark[0]) - (cpu - mark[1]) - (delay - mark[2]))

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total
