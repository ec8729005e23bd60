"""SIGTERM ends a watched run cleanly: run-end, final signed heads, then the default action.

SIGTERM is how SLURM, Kubernetes and most launchers preempt a job.  Python's
default action kills the process without running ``atexit``, so a run ended
that way had no run-end and no final head, and ``ledger verify`` could not tell
it from a stream cut back by someone else (TG1211 high on an honest run; red
team 4, A5).  At watch start, on the main thread, while SIGTERM still has its
default action, :func:`install` puts a handler in its place that closes every
open guard (run-end with ``reason: "terminated"``, final signed heads) and then
restores the default action and raises the signal again, so the process still
ends as killed by SIGTERM (exit status 143, what schedulers expect).

What it leaves alone, and why:

* a handler the program installed before watch (or SIG_IGN): the program
  decides whether SIGTERM ends the process; when it exits normally the guard is
  closed at exit, as after any script;
* a handler installed after watch that calls ours as its previous one
  (Lightning does): ours then does nothing, the later handler owns the exit;
* a process forked after watch (a DataLoader worker) that gets SIGTERM: the guards are
  its parent's, so it only takes the default action;
* a signal that arrives while the guard itself runs (its hooks, its recorder's
  lock, its close): closing then would interleave with a half-written step, so
  the signal is sent again a little later (at most :data:`MAX_DEFERRALS` times;
  then the default action runs, and the run is not ended, TG1211 as before).

SIGKILL and ``os._exit`` run no handler: the run then ends at its last signed
head, which the recorder signs every few seconds too (recorder.SIGN_SECONDS).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any

log = logging.getLogger("trainguard.monitor")

DEFER_SECONDS = 0.05
MAX_DEFERRALS = 40  # about two seconds of the guard's own work
# How long the handler waits for the recorder's lock held by another thread (the
# watchdog writing an alert); held by the main thread itself, it is never freed in time.
LOCK_WAIT_SECONDS = 0.2

# guard -> the pid that made it: a process forked from the training process (a DataLoader
# worker, which the loader ends with SIGTERM when it does not exit in time) inherits this
# handler and the guards, and must never write the parent's run-end into the ledger.
_guards: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# Deferrals so far, counted without rebinding a global (monitor/ownstate.py holds this
# package's globals fixed after import: a rebound one reads as the guard tampered with).
_deferrals = itertools.count()


def install(guard: Any) -> None:
    """Close ``guard`` on SIGTERM (see the module's docstring for when nothing is done)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    _guards[guard] = os.getpid()
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if signal.getsignal(signum) is not _on_sigterm:
        return  # called as the previous handler of a later one: that one owns the exit
    me = os.getpid()
    open_guards = [g for g, pid in list(_guards.items()) if pid == me and not g.recorder.finished]
    if any(_busy(g) for g in open_guards) and next(_deferrals) < MAX_DEFERRALS:
        timer = threading.Timer(DEFER_SECONDS, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    for guard in open_guards:
        if guard._closed:
            continue  # a close interrupted past its deferrals: nothing safe to add
        try:
            guard.close(reason="terminated")
        except Exception:  # the process ends anyway: a failed close is a warning
            log.warning("trainguard: closing run %s on SIGTERM failed", guard.run_id, exc_info=True)
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def _busy(guard: Any) -> bool:
    """The main thread is inside the guard: its hooks, its close, or its recorder."""
    if guard._busy is not None or guard._closed:
        return True
    lock = guard.recorder._lock
    if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
        return True
    lock.release()
    return False
