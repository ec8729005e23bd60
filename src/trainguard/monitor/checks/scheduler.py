"""What a learning-rate scheduler computes with, and how often it steps (TG1303).

The guard recomputes the schedule on a copy (monitor/schedule.py), but a deep
copy keeps function objects: ``LambdaLR``'s lambda, its closure cells and the
globals it reads are shared by the real scheduler and the copy, and the copy
catches up to the real ``last_epoch`` however many times it stepped.  Red team
4 changed the learning rate through both (A02): a global the lambda reads
rebound (``WARM = 400``) with the param groups set to what the changed lambda
gives, and 25 extra ``scheduler.step()`` calls once, or one extra every step.

Two invariants, both checked at every ``guard.step`` (budget mode too: a few
dozen objects compared, microseconds), high at the step:

* :class:`ScheduleCode`: the functions a scheduler holds (``lr_lambdas``, any
  function or ``functools.partial`` in its attributes, those of the schedulers
  it chains) keep their code, defaults, closure contents and the globals their
  code reads (followed into the functions those name, like the optimizer's
  globals route in monitor/identity.py), taken by value at start;
* :class:`StepCount`: the scheduler's ``last_epoch`` and ``_step_count``
  advance at most once between two ``guard.step`` calls, or as often as they
  did at most in the ``WARMUP`` steps after the first (a loop stepping it per
  micro-batch with gradient accumulation: k per step).  The first step is
  not judged (a loop may step the scheduler once before training).

A loop that changes its schedule on purpose (a longer run, an extra step on
resume) declares it at that step: ``guard.step(changed=["scheduler"])`` (with
``lr=`` for a rate it wrote itself); the guard's copy is then taken again.
Not seen: code that reads globals by name (``globals()[...]``) or attributes
of objects more than one level below a global or cell, and functions of other
modules (``math.cos`` rebound: the identity routes watch torch's).
"""

from __future__ import annotations

import types
from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import StepEnd
from trainguard.monitor.forwards import declared_names
from trainguard.monitor.schedcalls import Call, Site
from trainguard.monitor.schedule import ScheduleModel
from trainguard.monitor.valuedigest import ValueDigest

WARMUP = 3  # checked steps whose advance sets the cadence
DECLARED = "scheduler"  # guard.step(changed=["scheduler"])


class ScheduleCode(ValueDigest):
    """The functions one scheduler holds, by value (monitor/valuedigest.py)."""

    def __init__(self, scheduler: Any, copied: bool = False, name: str = "scheduler") -> None:
        self.scheduler = scheduler
        self.name = name
        # The guard's copy deep-copies the callable objects a scheduler holds and replays
        # its calls (monitor/schedule.py): their attributes are state, compared with the
        # copy's after each replay (an object that remembers its last factor is honest).
        super().__init__(self._roots, copied)

    def _roots(self) -> list[tuple[str, Any]]:
        return [(f"{self.name}.{k}", v) for k, v in _callables(self.scheduler)]


class StepCount:
    """How often, and from where, one scheduler steps between two ``guard.step`` calls
    (one optimizer step: ``optimizer.step(); scheduler.step(); guard.step()``).

    Observed (monitor/schedcalls.py), each call is counted and its call site known; else
    its counters (``last_epoch``, ``_step_count``) are read."""

    def __init__(self, scheduler: Any, observed: bool = False) -> None:
        self.scheduler = scheduler
        self.observed = observed
        self.last = _counters(scheduler)
        self.first = True  # the first step may also hold a step made before training
        self.rates: list[int] = []  # advances at the first checked steps
        self.cadence: int | None = None
        self.sites: set[Site] = set()  # where the loop steps it from
        self.at = 0  # guard steps checked
        self.last_call: int | None = None  # the last checked step it stepped at
        self.period: int | None = None  # guard steps between its first two such steps

    def check(self, calls: list[Call]) -> str | None:
        """A message when the scheduler stepped more often than the optimizer allows, or
        once more from a new place off its period."""
        now = _counters(self.scheduler)
        moved = max((b - a for a, b in zip(self.last, now, strict=True)), default=0)
        if self.observed:
            moved = len(calls)
        self.last = now
        at, self.at = self.at, self.at + 1
        new = sorted({c.site for c in calls} - self.sites)
        if self.first:
            self.first = False
            self.sites.update(new)
            return None
        message = None
        if self.cadence is None:
            self.rates.append(moved)
            if len(self.rates) >= WARMUP:
                self.cadence = max(1, *self.rates)
        elif moved > self.cadence:
            message = (
                f"the scheduler stepped {moved} times in one optimizer step where it steps at "
                f"most {self.cadence}: extra scheduler.step() calls move the learning rate "
                "along its schedule (the guard's copy follows the count)"
            )
        if moved and new and self.sites and message is None:
            message = self._off_period(at, new)
        if moved:
            if self.last_call is not None and self.period is None:
                self.period = at - self.last_call
            self.last_call = at
        self.sites.update(new)
        return message

    def _off_period(self, at: int, new: list[Site]) -> str | None:
        """A call from a place the loop never stepped it from: the loop's own when it
        keeps the scheduler's period (a warm-up loop, then the main loop), else an extra
        step (a per-epoch scheduler stepped once more: an extra epoch of decay)."""
        if self.last_call is None:
            return None
        # Before a second step the period is the first step's distance from the start
        # (a fresh run steps a per-epoch scheduler at the end of its first epoch).
        period = self.period if self.period is not None else self.last_call + 1
        gap = at - self.last_call
        if gap == period:
            return None
        where = ", ".join(_where(s) for s in new[:3])
        known = ", ".join(_where(s) for s in sorted(self.sites)[:3])
        return (
            f"scheduler.step() called from {where}, where the loop never stepped it (it "
            f"steps from {known}), {gap} steps after its last step where it steps every "
            f"{period}: an extra step moves the learning rate along its schedule"
        )


def _where(site: Site) -> str:
    return " <- ".join(f"{f}:{n}" for f, n in site)


def _counters(scheduler: Any) -> tuple[int, ...]:
    out = []
    for name in ("last_epoch", "_step_count"):
        value = getattr(scheduler, name, None)
        out.append(value if isinstance(value, int) and not isinstance(value, bool) else 0)
    return tuple(out)


def _callables(scheduler: Any, depth: int = 0) -> list[tuple[str, Any]]:
    """The functions and callable objects a scheduler holds (not its own methods), and
    those of the schedulers it chains (SequentialLR, ChainedScheduler)."""
    out: list[tuple[str, Any]] = []
    for key, value in list(vars(scheduler).items()):
        if key == "optimizer":
            continue
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            label = key if i is None else f"{key}[{i}]"
            if hasattr(v, "last_epoch") and hasattr(v, "optimizer") and depth < 3:
                out += [(f"{label}.{k}", f) for k, f in _callables(v, depth + 1)]
            elif callable(v) and not isinstance(v, (type, types.MethodType)):
                out.append((label, v))
    return out


class ScheduleWatch:
    """The invariants for the schedulers of one optimizer, at every ``guard.step``:
    their functions, how often and from where they step, and their state against the
    guard's replayed copy (monitor/schedule.py)."""

    def __init__(self, model: ScheduleModel) -> None:
        self.model = model
        several = len(model.reals) > 1
        names = [f"scheduler[{i}]" if several else "scheduler" for i in range(len(model.reals))]
        self.code = [
            ScheduleCode(s, model.observed, n) for s, n in zip(model.reals, names, strict=True)
        ]
        self.count = [StepCount(s, model.observed) for s in model.reals]
        self.names = [f"{n} ({type(s).__name__})" for s, n in zip(model.reals, names, strict=True)]
        self.declared = False  # the last guard.step declared changed=["scheduler"]

    def check(self, ctx: Context, end: StepEnd) -> list[Alert]:
        found = []
        changed = [label for code in self.code for label in code.changed()]
        if changed:
            found.append(
                ctx.alert(
                    "TG1303",
                    "the scheduler's functions changed (code, defaults, closure or the "
                    f"globals they read): {', '.join(changed[:5])}: the learning rate they "
                    "compute is someone else's",
                    key="scheduler",
                    changes=changed[:50],
                )
            )
        recent = self.model.log.take_recent()
        for i, (count, name) in enumerate(zip(self.count, self.names, strict=True)):
            extra = count.check([c for c in recent if c.which == i])
            if extra is not None:
                named = f"{name}: {extra}" if len(self.count) > 1 else extra
                found.append(ctx.alert("TG1303", named, key="scheduler"))
        moved = self.model.tampered()
        if moved:
            found.append(
                ctx.alert(
                    "TG1303",
                    f"the scheduler's state is not what its step calls give: "
                    f"{'; '.join(moved[:5])} (the guard's copy, replaying every "
                    "scheduler.step() call with its arguments, holds the first value: a "
                    "counter or setting written without a step, a scheduler rewound or "
                    "moved ahead)",
                    key="scheduler",
                    changes=moved[:50],
                )
            )
            self.model.resync()
        self.declared = DECLARED in declared_names(end.declared_changes)
        return [] if self.declared else found
