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
from typing import Any

# Captured once, at import: the guard never looks these names up again.
_PERF_COUNTER = time.perf_counter
_MONOTONIC = time.monotonic
_THREAD_TIME = time.thread_time
# The OS reads behind run_delay (red team 2026-12-05 A11b: ``os.pread`` wrapped to report
# slept nanoseconds as run-queue delay made a 3.7x slower step look like contention).
_PREAD = os.pread
_OPEN = os.open
_CLOSE = os.close
_FSTAT = os.fstat
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
# The process's Python threads (only they can hold the GIL): OtherThreads below.
_ENUMERATE = threading.enumerate
MAX_THREADS = 32  # Python threads read per step; more are not read (their time excuses none)
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


class Kept:
    """A file kept open and re-read from its start (a /proc or cgroup file is generated
    anew at each read: no open per step).  The number of a kept-open file is the process's
    to reuse: ``os.dup2`` of a file of its own onto it would make every later read say what
    that file says (a faked ``run_delay``).  Each read first checks that the number still
    names the file opened (device and inode: one ``fstat``); once it does not, ``read``
    returns None and ``replaced`` is set: the checks reading it report that, and read no
    wait for a CPU from it (no contention excuse)."""

    __slots__ = ("__weakref__", "_closer", "_fd", "_ident", "path", "replaced")

    def __init__(self, path: str) -> None:
        self.path, self.replaced = path, False
        self._fd: int | None = None
        self._ident = (0, 0)
        self._closer: weakref.finalize[..., Any] | None = None
        try:
            fd = _OPEN(path, os.O_RDONLY)
        except OSError:
            return
        st = _FSTAT(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        # Closed once: by close(), or when the holder is gone (a guard never closed).
        self._closer = weakref.finalize(self, _close_quietly, fd)

    @property
    def opened(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        self._fd = None
        if self._closer is not None:
            self._closer()  # at most once, whoever calls it first

    def read(self, size: int = 4096, *, verify: bool = True) -> bytes | None:
        """``verify=False``: the caller calls ``verify`` itself, once for several reads."""
        fd = self._fd
        if fd is None or self.replaced or (verify and not self.verify()):
            return None
        try:
            return _PREAD(fd, size, 0)
        except OSError:
            return None

    def verify(self) -> bool:
        """Whether the number still names the file opened (sets ``replaced`` if not)."""
        if self._fd is None or self.replaced:
            return False
        try:
            st = _FSTAT(self._fd)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != self._ident:
            self.replaced = True
        return not self.replaced


def _close_quietly(fd: int) -> None:
    try:
        _CLOSE(fd)
    except OSError:  # already closed by whoever replaced it
        pass


def delay_of(kept: Kept, *, verify: bool = True) -> float | None:
    """Seconds the thread that opened ``kept`` (its schedstat) has waited on a run queue."""
    data = kept.read(200, verify=verify)
    try:
        return int(data.split()[1]) / 1e9 if data is not None else None
    except (ValueError, IndexError):
        return None


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
        self._file = Kept(SCHEDSTAT)  # this thread's file (it names the thread that opened it)
        self.path = SCHEDSTAT
        self.reported = False  # whether a check has said the file was replaced
        self.has_delay = delay_of(self._file) is not None
        self._last = self._read()

    @property
    def replaced(self) -> bool:
        """Whether the kept file's number was made to name another file (``Kept``)."""
        return self._file.replaced

    def _read(self) -> tuple[float, float, float]:
        return _PERF_COUNTER(), _THREAD_TIME(), (delay_of(self._file) or 0.0)

    def lap(self) -> tuple[float, float, float] | None:
        if threading.get_ident() != self.thread:
            return None
        now = self._read()
        wall, cpu, delay = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        # A replaced file reads no delay from then on: its last reading is not undone.
        return wall, cpu, max(0.0, delay) if self.replaced else delay

    def close(self) -> None:
        self._file.close()


class OffCpu:
    """Seconds the thread that made it was blocked (wall minus its CPU time minus its
    wait for a CPU: asleep, or waiting on I/O, a lock or another thread) inside the spans
    marked with ``begin``/``end``, summed until ``take``.  The guard's own phase is judged
    by it (checks/timing.py): its CPU time is its own work, and a busy machine is not
    blocking.  A span in another thread counts nothing (the file names this thread)."""

    __slots__ = ("__weakref__", "_file", "_thread", "off", "total")

    def __init__(self, share: OffCpu | None = None) -> None:
        self.total = 0.0
        self.off = 0.0  # the same without taking the wait for a CPU off
        self._thread = threading.get_ident()
        # Closed with the guard that holds it; ``share``: another's file (one per guard).
        self._file: Kept = share._file if share is not None else Kept(SCHEDSTAT)

    def begin(self) -> tuple[float, float, float]:
        if threading.get_ident() != self._thread:
            return (0.0, 0.0, -1.0)
        return _PERF_COUNTER(), _THREAD_TIME(), (delay_of(self._file, verify=False) or 0.0)

    def end(self, mark: tuple[float, float, float]) -> None:
        if mark[2] < 0 or threading.get_ident() != self._thread:
            return
        delay = delay_of(self._file, verify=False) or 0.0
        wall, cpu = _PERF_COUNTER(), _THREAD_TIME()
        off = max(0.0, (wall - mark[0]) - (cpu - mark[1]))
        self.off += off
        self.total += max(0.0, off - max(delay - mark[2], 0.0))

    def take(self) -> float:
        """The sum since the last take.  The file is checked here, once, not at each
        span's ends: once replaced, no wait for a CPU is taken off (wall minus CPU)."""
        total, off, self.total, self.off = self.total, self.off, 0.0, 0.0
        return total if self._file.verify() or not self._file.opened else off


class OtherThreads:
    """Seconds the process's other Python threads ran or waited for a CPU, per lap.

    Only a Python thread can hold the GIL; while one does, the training thread waiting
    for it is blocked (off CPU, not on a run queue) although nothing slept: on a busy
    machine the holder itself waits for a CPU, and the wait shows as the guard's phase
    blocked (checks/timing.py).  A thread's running and waiting time bounds how long it
    can have held the GIL.  Read at most ``MAX_THREADS`` threads (a thread not read
    excuses nothing); a thread that ended during the lap is not counted (its time
    excuses nothing either)."""

    __slots__ = ("_last", "_step", "_value")

    def __init__(self) -> None:
        self._last: dict[int, float] = {}
        self._step, self._value = -1, 0.0
        self.lap()

    def at(self, step: int) -> float:
        """The lap ending at ``step``, read once however many checks ask (the step-time
        and sleep checks share one: each read of the threads' files costs ~30 us)."""
        if step != self._step:
            self._step, self._value = step, self.lap()
        return self._value

    def lap(self) -> float:
        """The sum since the last lap (0.0 where the kernel does not say: no excuse)."""
        me = threading.get_ident()
        seen: dict[int, float] = {}
        total = 0.0
        for t in _ENUMERATE()[:MAX_THREADS]:
            tid = t.native_id
            if t.ident == me or tid is None:
                continue
            busy = _busy(tid)
            if busy is None:
                continue
            seen[tid] = busy
            # A thread first seen now counts from its start: it ran in this lap or not at all.
            total += max(0.0, busy - self._last.get(tid, 0.0))
        self._last = seen
        return total


def _busy(tid: int) -> float | None:
    """Seconds thread ``tid`` of this process has run plus waited on a run queue."""
    try:
        fd = _OPEN(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
    except OSError:
        return None
    try:
        fields = _PREAD(fd, 200, 0).split()
        return (int(fields[0]) + int(fields[1])) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    finally:
        _CLOSE(fd)
