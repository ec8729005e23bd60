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
coverage tool's (by the module its code comes from) and gc callbacks (given no frame)
at medium (a gc callback from installed code, as Hypothesis leaves one in a test
process, not at all: editing installed code is env verify's), any other trace or profile
function (it can rewrite frames) at high.  Any change during the run is high, a debugger
attached mid-run included (say so with a fresh ``watch()``).  Not seen: trace functions of
other threads (``threading.settrace`` covers threads started later, and is read),
``sys.monitoring`` (Python 3.12+).
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.checks.surface import _Learner
from trainguard.monitor.hookcode import home, name, targets

# Top-level packages of debuggers, profilers and coverage tools: what an honest run under
# a developer's tools has installed (named at medium, not high).
TOOLS = frozenset(
    {
        "bdb",
        "pdb",
        "cProfile",
        "profile",
        "_lsprof",
        "coverage",
        "pydevd",
        "_pydevd_bundle",
        "_pydev_bundle",
        "_pydevd_frame_eval",
        "debugpy",
        "pudb",
        "ipdb",
        "IPython",
        "line_profiler",
        "pyinstrument",
        "yappi",
        "viztracer",
        "scalene",
    }
)
SLOTS = ("sys.settrace", "sys.setprofile", "threading.settrace", "threading.setprofile")


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


def tool(obj: Any) -> bool:
    return origin(obj).split(".")[0] in TOOLS


class TracingCheck(Check):
    """What the interpreter calls at every frame or collection, held to start-up."""

    def __init__(self) -> None:
        self.baseline = installed()

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
            if tool(obj):
                what = "runs at every frame or collection; a debugger, profiler or coverage tool"
            elif collector:
                what = "runs at every collection; it is given no frame"
            else:
                what = "runs at every frame and can rewrite a frame's locals"
            out.append(
                ctx.alert(
                    "TG1304",
                    f"installed before watch() started: {named} ({what})",
                    severity=Severity.MEDIUM if tool(obj) or collector else Severity.HIGH,
                    functions=[label],
                    at_start=True,
                )
            )
        return out

    def _check(self, ctx: Context) -> list[Alert]:
        now = installed()
        if len(now) == len(self.baseline) and all(map(_is, now, self.baseline)):
            return []
        before, self.baseline = self.baseline, now
        labels = _labels(now) if len(now) >= len(before) else _labels(before)
        moved = [
            i
            for i in range(len(labels))
            if i >= len(now) or i >= len(before) or now[i] is not before[i]
        ]
        changed = [labels[i] for i in moved]
        shown = ", ".join(
            f"{labels[i]} = {origin(now[i])}"
            if i < len(now) and now[i] is not None
            else f"{labels[i]} removed"
            for i in moved[:5]
        )
        return [
            ctx.alert(
                "TG1304",
                f"trace, profile or gc callback changed at run time: {shown}",
                severity=Severity.HIGH,
                functions=changed[:50],
            )
        ]

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)


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
