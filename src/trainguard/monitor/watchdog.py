"""A watchdog for ranks that hang without dying (TG1313).

A rank stuck in a collective whose peer never arrives, a data loader worker
that never answers, or injected code that sleeps forever does not crash: it
simply stops.  One daemon thread per guard wakes a few times per threshold
and compares the time since the last completed step with

    max(hang_factor x median step time, hang_seconds)

(``hang_seconds`` alone until the guard has timed enough steps).  The
training thread does nothing for it: the guard already stores when each step
ended.  When the limit is passed the watchdog raises one alert for the stall,
with the last completed step, where the training thread is (the Python stacks
of all threads, innermost frame last) and, when it waits inside
``torch.distributed``, which collective.  When steps resume it records a
``stall-end`` record with the stall's length.  ``on_hang="abort"`` then ends
the process (exit code :data:`HANG_EXIT_CODE`), so that a launcher restarts
the job and the peers' next collective fails instead of waiting forever.

While the training thread waits inside a ``torch.distributed`` collective for
longer than :data:`WAIT_NOTE_SECONDS` (or twice the median step, up to
:data:`WAIT_NOTE_CAP_SECONDS`), the watchdog also writes a small
``rank-waiting`` record every :data:`WAIT_NOTE_EVERY` seconds (the collective,
the last step).  It is no alert: it is this rank's proof of life.  When a peer
dies, the ranks whose collective failed read these notes (distributed.py) and
tell a survivor that is blocked behind the dead rank (TG1314) from the dead
rank itself (TG1311), which writes nothing.

Work between steps that is not a hang (evaluation, saving a checkpoint) is
marked with :meth:`Watchdog.touch` or wrapped in :meth:`Watchdog.paused`; the
Hugging Face and Lightning callbacks do this for their evaluation loops.

The thread needs the GIL to run: a hang inside C code that holds it (rare:
blocking calls in torch release it) stops the watchdog too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert

log = logging.getLogger("trainguard.monitor")

DEFAULT_HANG_SECONDS = 300.0
DEFAULT_HANG_FACTOR = 20.0
# The thread wakes about this many times per threshold, at most once a second.
POLLS_PER_THRESHOLD = 10
MAX_POLL_SECONDS = 1.0
MIN_POLL_SECONDS = 0.01
# Evidence bounds: stacks go into one ledger record.
MAX_THREADS = 32
MAX_FRAMES = 40
MAX_LINE_CHARS = 300
# How long the watchdog waits to write its alert (the ledger may be what hangs).
ALERT_WRITE_SECONDS = 30.0
# A wait inside a collective longer than this gets a rank-waiting note, renewed at
# this interval while it lasts: well inside distributed.FAILED_GRACE_SECONDS, so
# that a peer's grace period sees a fresh one.  One small record per interval of
# waiting bounds what honest waits (a slow peer) add to the ledger.
# How long the guard's own hooks may run before a stall counts again (a guard blocked in
# its own collective behind a dead peer is reported, a few seconds late).
GUARD_BUSY_GRACE_SECONDS = 5.0
WAIT_NOTE_SECONDS = 2.0
# A run whose steps are slow waits in its collectives every step (a straggler peer):
# a note only once a wait passes twice the median step, so that such runs do not
# write one per step; capped so that a peer's grace period still sees a note.
WAIT_NOTE_FACTOR = 2.0
WAIT_NOTE_CAP_SECONDS = 5.0
WAIT_NOTE_EVERY = 4.0
WAITING_KIND = "rank-waiting"
# The exit code of a process ended by on_hang="abort" (as timeout(1) uses).
HANG_EXIT_CODE = 124
ON_HANG = ("record", "abort")

_DISTRIBUTED = os.sep.join(("torch", "distributed", ""))


class Watchdog:
    """Watches a guard from a daemon thread; see the module docstring."""

    def __init__(
        self,
        guard: Any,
        *,
        hang_seconds: float = DEFAULT_HANG_SECONDS,
        factor: float = DEFAULT_HANG_FACTOR,
        on_hang: str | Callable[[Any], None] = "record",
        stacks: bool = True,
    ) -> None:
        if not hang_seconds > 0:
            raise ValueError("hang_seconds must be a positive number of seconds")
        if not factor >= 0:
            raise ValueError("hang_factor must be zero or more")
        if not callable(on_hang) and on_hang not in ON_HANG:
            raise ValueError(f"on_hang must be one of {', '.join(ON_HANG)} or a callable")
        self.hang_seconds = float(hang_seconds)
        self.factor = float(factor)
        self.on_hang = on_hang
        self.stacks = stacks
        self._guard = weakref.ref(guard)
        self._training_thread = threading.get_ident()
        self._touched = clock.now()
        self._paused = 0
        self._median = 0.0
        self._stalled_since: float | None = None  # the progress mark a reported stall began at
        self._noted: tuple[float, float] | None = None  # (progress mark, time) of the last note
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"trainguard-watchdog-rank{guard.rank}", daemon=True
        )

    @classmethod
    def start_for(
        cls,
        guard: Any,
        hang_seconds: float | None,
        *,
        factor: float = DEFAULT_HANG_FACTOR,
        on_hang: str | Callable[[Any], None] = "record",
        stacks: bool = True,
    ) -> Watchdog | None:
        """A started watchdog for ``guard``, or None when ``hang_seconds`` is None."""
        if hang_seconds is None:
            return None
        dog = cls(guard, hang_seconds=hang_seconds, factor=factor, on_hang=on_hang, stacks=stacks)
        dog._thread.start()
        return dog

    @classmethod
    def for_guard(cls, guard: Any, options: Any) -> Watchdog | None:
        """:meth:`start_for` with the hang options of ``options`` (a WatchOptions)."""
        return cls.start_for(
            guard,
            options.hang_seconds,
            factor=options.hang_factor,
            on_hang=options.on_hang,
            stacks=options.hang_stacks,
        )

    # -- what the training side may call --------------------------------------
    def touch(self) -> None:
        """Mark progress that is not a training step (an evaluation batch, a save)."""
        self._touched = clock.now()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No stall is reported inside this block; the clock restarts when it ends."""
        self._paused += 1
        try:
            yield
        finally:
            self._touched = clock.now()
            self._paused -= 1

    def stop(self) -> None:
        """End the thread; a reported stall that has since ended gets its record now."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=MAX_POLL_SECONDS * 5)
        guard = self._guard()
        if guard is not None and not self._thread.is_alive():
            self._progress(guard)

    def threshold(self) -> float:
        """Seconds without a completed step that count as a stall, as of now."""
        guard = self._guard()
        if guard is not None:
            self._median = _median(guard.windows["time"]) or self._median
        return max(self.hang_seconds, self.factor * self._median)

    # -- the thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            limit = self.threshold()
            poll = min(MAX_POLL_SECONDS, max(MIN_POLL_SECONDS, limit / POLLS_PER_THRESHOLD))
            if self._stop.wait(poll):
                return
            guard = self._guard()
            if guard is None:
                return
            mark = self._progress(guard)
            idle = clock.now() - mark
            note_after = min(WAIT_NOTE_CAP_SECONDS, WAIT_NOTE_FACTOR * self._median)
            if idle > max(WAIT_NOTE_SECONDS, note_after):
                self._note_wait(guard, mark, idle)
            busy = guard._busy
            if busy is not None and clock.now() - busy < GUARD_BUSY_GRACE_SECONDS:
                continue  # the guard's own work is not the training's stall
            if self._stalled_since is not None or self._paused:
                continue
            if idle > limit:
                self._stalled_since = mark
                self._report(guard, idle, limit)

    def _note_wait(self, guard: Any, mark: float, idle: float) -> None:
        """A ``rank-waiting`` record when the training thread waits in a collective."""
        now = clock.now()
        if (
            self._noted is not None
            and self._noted[0] == mark
            and now - self._noted[1] < WAIT_NOTE_EVERY
        ):
            return
        collective = _collective(sys._current_frames().get(self._training_thread))
        if collective is None:
            return  # not waiting for peers: nothing a peer should read as alive and blocked
        self._noted = (mark, now)
        last_step = guard.step_index - 1 if guard.step_index else None
        payload = {"collective": collective, "seconds": round(idle, 3), "last_step": last_step}
        _in_thread(lambda: guard._record(WAITING_KIND, payload), "trainguard-watchdog-note")

    def _progress(self, guard: Any) -> float:
        """The last progress mark; records the end of a reported stall once it moved."""
        mark = max(guard._last_step_end, self._touched)
        since = self._stalled_since
        if since is not None and mark != since:
            self._stalled_since = None
            self._record_end(guard, since, mark)
        return float(mark)

    def _report(self, guard: Any, idle: float, limit: float) -> None:
        last_step = guard.step_index - 1 if guard.step_index else None
        frames = sys._current_frames()
        frame = frames.get(self._training_thread)
        own = _format(frame)
        collective = _collective(frame)
        if collective:
            where = f"waiting in torch.distributed {collective}"
        elif frame is not None:
            name = os.path.basename(frame.f_code.co_filename)
            where = f"in {frame.f_code.co_name} ({name}:{frame.f_lineno})"
        else:
            where = "the training thread has ended"
        after = f"after step {last_step}" if last_step is not None else "before step 0"
        evidence: dict[str, Any] = {
            "seconds": round(idle, 3),
            "threshold": round(limit, 3),
            "median_step_seconds": round(self._median, 6) if self._median else None,
            "last_step": last_step,
            "local_rank": _local_rank(guard.rank),
            "collective": collective,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        if self.stacks:
            evidence["stack"] = own
            evidence["threads"] = self._other_threads(frames)
        message = f"rank {guard.rank} stalled: no step for {idle:.1f} s {after}; {where}"
        if not _in_thread(
            lambda: _write_alert(guard, message, evidence), "trainguard-watchdog-alert"
        ):
            log.error(
                "trainguard: could not record the stall in %ss: %s", ALERT_WRITE_SECONDS, message
            )
        self._act(guard, message, evidence)

    def _act(self, guard: Any, message: str, evidence: dict[str, Any]) -> None:
        if callable(self.on_hang):
            found = [a for a in list(guard.alerts) if a.rule == "TG1313"]
            if found:
                alert = found[-1]
            else:  # not recorded (the ledger hangs too): hand over what it would have been
                alert = Alert.of("TG1313", guard.step_index, guard.rank, message, evidence)
            try:
                self.on_hang(alert)
            except Exception:  # the watchdog must keep watching
                log.exception("trainguard: the on_hang callable failed")
        elif self.on_hang == "abort":
            log.critical("trainguard: %s; ending the process (on_hang='abort')", message)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            with contextlib.suppress(Exception):
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            os._exit(HANG_EXIT_CODE)

    def _record_end(self, guard: Any, since: float, mark: float) -> None:
        payload = {"rule": "TG1313", "seconds": round(mark - since, 3), "rank": guard.rank}
        try:
            guard._record("stall-end", payload)
        except Exception:
            log.exception("trainguard: could not record the end of a stall")

    def _other_threads(self, frames: dict[int, Any]) -> dict[str, list[str]]:
        names = {t.ident: t.name for t in threading.enumerate()}
        me = threading.get_ident()
        out: dict[str, list[str]] = {}
        for ident, frame in frames.items():
            if ident in (me, self._training_thread) or len(out) >= MAX_THREADS:
                continue
            out[f"{names.get(ident, 'thread')} ({ident})"] = _format(frame)
        return out


def _in_thread(write: Callable[[], None], name: str) -> bool:
    """Run ``write`` in a daemon thread for at most ALERT_WRITE_SECONDS (the ledger may
    be what hangs); whether it finished."""

    def run() -> None:
        try:
            write()
        except Exception:  # a closed or broken ledger: the watchdog keeps watching
            log.exception("trainguard: the watchdog could not write to the ledger")

    writer = threading.Thread(target=run, name=name, daemon=True)
    writer.start()
    writer.join(ALERT_WRITE_SECONDS)
    return not writer.is_alive()


def _write_alert(guard: Any, message: str, evidence: dict[str, Any]) -> None:
    try:
        guard._alert("TG1313", message, **evidence)
    except Exception:  # a closed or broken ledger: the log line still says it
        log.exception("trainguard: could not record the stall: %s", message)


def _median(window: Any) -> float:
    """The median of a guard's step-time window, once it has enough steps (0 before)."""
    for _ in range(3):
        try:
            values = sorted(window.values)  # may race with the training thread's append
        except RuntimeError:
            continue
        if len(values) < window.warmup:
            return 0.0
        n = len(values)
        return float(values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2)
    return 0.0


def _format(frame: Any) -> list[str]:
    """``file:line in function: code`` for the innermost MAX_FRAMES frames, innermost last."""
    if frame is None:
        return []
    summary = traceback.extract_stack(frame)[-MAX_FRAMES:]
    lines = []
    for f in summary:
        text = f"{f.filename}:{f.lineno} in {f.name}"
        if f.line:
            text += f": {f.line.strip()}"
        lines.append(text[:MAX_LINE_CHARS])
    return lines


def _collective(frame: Any) -> str | None:
    """The innermost ``torch.distributed`` function the frame is inside, if any."""
    while frame is not None:
        if _DISTRIBUTED in frame.f_code.co_filename.replace("/", os.sep):
            return str(frame.f_code.co_name)
        frame = frame.f_back
    return None


def _local_rank(rank: int) -> int:
    value = os.environ.get("LOCAL_RANK")
    try:
        return int(value) if value is not None else rank
    except ValueError:
        return rank
