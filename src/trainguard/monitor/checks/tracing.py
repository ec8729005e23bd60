"""Trace and profile functions, and gc callbacks: per-step code that is no attribute.

Red team 2026-12-05 (A01, A15a, A17): ``sys.settrace`` on ``torch.autograd.backward``'s
return zeroed a layer's gradient; a trace callback rewrote ``clip_grad_norm_``'s local
``max_norm`` (Python 3.11 writes ``f_locals`` back); a no-op ``sys.setprofile`` set
before ``watch()`` kept the surface check from learning its hot names.  No name on
any route changes: the interpreter calls these at every frame.

The invariant: what ``sys.gettrace()``, ``sys.getprofile()``, ``threading``'s hooks
for new threads and ``gc.callbacks`` hold at start-up is what they hold at every
step (read at both optimizer hooks, in nanoseconds: a fixed cost, not a budget
unit).  At start-up whatever is installed is named: a debugger's, profiler's or
coverage tool's (verified by what runs: monitor/profilers.py) and gc callbacks (given
no frame) at medium (a gc callback from installed code, as Hypothesis leaves one in a
test process, not at all: editing installed code is env verify's), any other trace or
profile function (it can rewrite frames) at high.  A trace or profile function removed
is quiet (nothing runs).  Any other change during the run is high, a debugger attached
mid-run included, except inside ``with guard.profiling():`` (honest-user hunt: cProfile
for a few steps, torch's profiler with ``with_stack=True``): there a slot may take a
*verified* tool, which is held to that (the same object, verified again at every check
where that costs microseconds) until the window closes, and must be gone by the first
check after it.  Not seen: trace functions of other threads (``threading.settrace``
covers threads started later, and is read), ``sys.monitoring`` (Python 3.12+).
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.checks.surface import _Learner
from trainguard.monitor.hookcode import home, name, targets
from trainguard.monitor.profilers import known

SLOTS = ("sys.settrace", "sys.setprofile", "threading.settrace", "threading.setprofile")
# Tools whose verification is cheap enough (microseconds) to repeat at every check.
CHEAP = frozenset({"cProfile", "torch.profiler"})


def installed() -> tuple[Any, ...]:
    """What each slot holds now, then gc's callbacks (by identity); the surface check's
    own profiler (it learns the step's hot names for one step) reads as None."""
    profile = sys.getprofile()
    return (
        sys.gettrace(),
        None if _learner(profile) else profile,
        getattr(threading, "_trace_hook", None),
        getattr(threading, "_profile_hook", None),
        *gc.callbacks,
    )


def _labels(held: tuple[Any, ...]) -> list[str]:
    return [*SLOTS, *(f"gc.callbacks[{i}]" for i in range(len(held) - len(SLOTS)))]


def origin(obj: Any) -> str:
    """The module the code of ``obj`` runs in (through partials and bound methods): for
    a Python function the module whose namespace it runs in and whose file holds its
    code (``__module__`` is writable), else its class's module ("?" when unknown)."""
    found = targets(obj)
    first = found[0] if found else obj
    if isinstance(first, types.FunctionType):
        return home(first) or "?"
    return str(type(first).__module__ if not isinstance(first, type) else first.__module__)


class TracingCheck(Check):
    """What the interpreter calls at every frame or collection, held to start-up."""

    def __init__(self) -> None:
        self.baseline = installed()
        self._opened: tuple[Any, ...] | None = None  # the slots when guard.profiling() opened
        self._window = False
        self._held: dict[int, tuple[Any, str]] = {}  # slot -> tool accepted in a window

    def start(self, ctx: Context) -> list[Alert]:
        out = []
        for label, obj in zip(_labels(self.baseline), self.baseline, strict=True):
            if obj is None:
                continue
            named = f"{label}: {name(obj)} (code of {origin(obj)})"
            # A gc callback is given the collection's phase and counts, never a frame:
            # named at medium (Hypothesis installs one for the whole process; a planted
            # one that changes only later is high below).
            collector = label.startswith("gc.")
            if collector and _installed_code(obj):
                continue
            tool = "" if collector else known(obj)
            if tool:
                what = f"runs at every frame; verified as {tool}: a debugger, profiler or tool"
            elif collector:
                what = "runs at every collection; it is given no frame"
            else:
                what = "runs at every frame and can rewrite a frame's locals"
            out.append(
                ctx.alert(
                    "TG1304",
                    f"installed before watch() started: {named} ({what})",
                    severity=Severity.MEDIUM if tool or collector else Severity.HIGH,
                    functions=[label],
                    at_start=True,
                )
            )
        return out

    def profiling(self, ctx: Context, inside: bool) -> list[Alert]:
        """``guard.profiling()`` opens (``inside``) or closes; what changed since the last
        check is judged as inside the window (a profiler whose own ``with`` encloses the
        window starts just before it; it may stop after, before the next check)."""
        if inside:
            self._window, self._opened = True, self.baseline
            return self._check(ctx)
        out = self._check(ctx)
        self._window = False
        return out

    def _check(self, ctx: Context) -> list[Alert]:
        now = installed()
        if len(now) == len(self.baseline) and all(map(_is, now, self.baseline)):
            return self._recheck(ctx, now) if self._held else []
        before, self.baseline = self.baseline, now
        labels = _labels(now) if len(now) >= len(before) else _labels(before)
        moved = [
            i
            for i in range(len(labels))
            if i >= len(now) or i >= len(before) or now[i] is not before[i]
        ]
        out = self._recheck(ctx, now)
        moved = [i for i in moved if not self._accepted(ctx, i, now, out)]
        if not moved:
            return out
        changed = [labels[i] for i in moved]
        shown = ", ".join(
            f"{labels[i]} = {origin(now[i])}"
            if i < len(now) and now[i] is not None
            else f"{labels[i]} removed"
            for i in moved[:5]
        )
        hint = (
            "not a debugger, profiler or coverage tool guard.profiling() verifies"
            if self._window
            else "a profiler is declared with guard.profiling()"
        )
        return [
            *out,
            ctx.alert(
                "TG1304",
                f"trace, profile or gc callback changed at run time: {shown} ({hint})",
                severity=Severity.HIGH,
                functions=changed[:50],
            ),
        ]

    def _accepted(self, ctx: Context, i: int, now: tuple[Any, ...], out: list[Alert]) -> bool:
        """Whether slot ``i``'s change is honest: a trace or profile function removed
        (nothing runs), or in ``guard.profiling()`` a verified tool (held to the window)
        or what the slot held when it opened."""
        if i >= len(SLOTS):
            return False  # gc callbacks: any change is high
        obj = now[i]
        self._held.pop(i, None)
        if obj is None or (self._window and self._opened and obj is self._opened[i]):
            return True
        tool = known(obj) if self._window else ""
        if tool:
            self._held[i] = (obj, tool)
            out.append(
                ctx.alert(
                    "TG1316",
                    f"declared with guard.profiling(): {SLOTS[i]} = {tool}",
                    severity=Severity.LOW,
                    functions=[SLOTS[i]],
                    tool=tool,
                )
            )
        return bool(tool)

    def _recheck(self, ctx: Context, now: tuple[Any, ...]) -> list[Alert]:
        """A tool accepted in a window is verified again at every check (a timer swapped
        on a running profiler, ``__call__`` added to its class) and may not outlive it."""
        out = []
        for i, (obj, tool) in list(self._held.items()):
            if now[i] is not obj:  # moved: judged as a change
                continue
            if self._window and (tool not in CHEAP or known(obj) == tool):
                continue
            del self._held[i]
            why = "no longer verifies as" if self._window else "outlived guard.profiling():"
            out.append(
                ctx.alert(
                    "TG1304",
                    f"trace or profile function changed at run time: {SLOTS[i]} {why} {tool}",
                    severity=Severity.HIGH,
                    functions=[SLOTS[i]],
                )
            )
        return out

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)


@contextmanager
def profiling(guard: Any) -> Iterator[None]:
    """``with guard.profiling():`` (see :meth:`TracingCheck.profiling`)."""
    found = [c for c in guard.checks if isinstance(c, TracingCheck)]
    ctx = Context(guard.step_index, guard.rank)
    for check in found:
        guard.sink.raise_all(check.profiling(ctx, True))
    try:
        yield
    finally:
        ctx = Context(guard.step_index, guard.rank)
        for check in found:
            guard.sink.raise_all(check.profiling(ctx, False))


def _installed_code(obj: Any) -> bool:
    """Whether the Python code ``obj`` runs lies in the standard library, torch, trainguard
    or an installed package (False for anything without Python code to place)."""
    from trainguard.monitor import identity

    found = [f for f in targets(obj) if isinstance(f, types.FunctionType)]
    if not found:
        return False
    trusted = identity._trusted_dirs()
    return all(identity.origin(f).startswith(trusted) for f in found)


def _learner(obj: Any) -> bool:
    return isinstance(getattr(obj, "__self__", None), _Learner) and (
        getattr(obj, "__func__", None) is _Learner._profile
    )


def _is(a: Any, b: Any) -> bool:
    return a is b
