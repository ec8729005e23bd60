"""The guard checks itself: its checks, its sink and its samples as ``watch()`` made them.

Red team 2026-12-04 (#12, guard_selfpatch.py): in-process code blinded the guard
through its own instance state, with no patch anywhere the identity and surface
checks look: ``guard.sink.raise_all`` shadowed by an instance attribute that drops
every alert, ``guard.checks[:] = []``, the gradient probe's sample indices cut to
one element each.  The invariant: after start-up the guard's structure does not
change.  At every step (optimizer pre-hook and ``guard.step``), in microseconds:

* the guard's structural attributes (sink, checks, the per-phase lists, ledger
  recorder, fingerprinter, key, options...) are the very objects of start-up;
* the list of checks, and each phase's list, hold the same checks, in order;
* no instance attribute of the guard, its sink, recorder, fingerprinter, schedule
  or any check shadows a method of its class (beyond what start-up had);
* every sample index (a check's ``index``) holds the same tensors, sizes and
  version counters (a param group added later may add indices, never change them).

In budget mode the self-check is the schedule's unit ``integrity``: it runs at the
steps the schedule draws (every step of the warm-up), and at the steps its own
keyed draw puts under ``1 / SPARSEST`` whatever the schedule says (its key is a
copy taken at start-up: a schedule tampered with cannot switch it off).  It
compares against start-up, so a change made at a step it skips is found at the
next step it runs.

A violation is TG1304 (critical), reported once per finding through a path that
does not go through the objects that can be tampered with: straight to the list
the guard's ``alerts`` is, the ledger recorder's ``append`` captured at start-up,
the log, and (``on_alert="stop"``) an exception raised at once.

What this cannot do: code that can rewrite the guard can also rewrite this check,
the captured references, or the interpreter.  In-process self-checks raise the
cost of blinding the guard and make the casual ways loud; the answer to an
adversary in the process is ``trainguard verify-run`` off the training host.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
from collections import deque
from itertools import repeat
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import clock, ownstate
from trainguard.monitor.alerts import Alert, TrainingStopped
from trainguard.monitor.budget import RECENT, SPARSEST, WARMUP_STEPS, keyed_draw

log = logging.getLogger("trainguard.monitor")

# The guard's attributes that never change after start-up.
PINNED = (
    "sink",
    "alerts",
    "checks",
    "tamper",
    "hyper",
    "identity",
    "direction",
    "seeds",
    "samples",
    "schedule",
    "recorder",
    "ledger",
    "fp",
    "key",
    "options",
    "model",
    "optimizer",
    "named_params",
    "_hooks",
    "_phase",
    "_off",  # the guard's own blocked time (checks/timing.py): a fake one reads 0
    "_waits",
)
MAX_INDEXED = 10_000  # sample indices followed per guard
UNIT = "integrity"  # budget mode: the schedule's unit


class SelfCheck:
    def __init__(self, guard: Any) -> None:
        self._guard = weakref.ref(guard)
        self._pinned: dict[str, Any] = {name: getattr(guard, name, None) for name in PINNED}
        self._checks = tuple(guard.checks)
        # Checks that run checks of their own (a further optimizer's lane), found once.
        self._lanes = tuple([c for c in self._checks if _inner(c)])
        self._phases = {k: tuple(v) for k, v in (getattr(guard, "_phase", None) or {}).items()}
        objects = self._objects(guard)
        self._objs = tuple(objects)
        # Per object, its instance attributes' names at start and those shadowing a method:
        # only a name added since can shadow one more (cheap: a keys comparison per step).
        self._keys = [frozenset(vars(o)) if hasattr(o, "__dict__") else None for o in objects]
        self._shadows = {id(o): _shadows(o) for o in objects}
        self._indices = _indices(objects)
        # trainguard.monitor's own module state (ownstate.py), against what import found:
        # a table cleared or a threshold rebound before watch() is named at the first check.
        self._own, self._before = _own_state()
        # The alert path, captured now: none of it is looked up on the guard again.
        self._alerts: list[Alert] = guard.sink.alerts
        self._append = guard.recorder.append
        self._on_alert = guard.options.on_alert
        self._reported: set[str] = set()
        # Budget mode: the schedule (its draws and costs) and a key of our own for the floor.
        self._schedule = getattr(guard, "schedule", None)
        self._key = bytes(guard.key[:32]) if self._schedule is not None else b""
        self._due: tuple[int, bool] = (-1, True)  # the step last asked about, and the answer
        self.ran: deque[int] = deque(maxlen=RECENT)  # budget mode: the steps it ran at

    def due(self, step: int) -> bool:
        """Whether the self-check runs at ``step``: always outside budget mode; in it, at
        the schedule's draws for the unit, and at least at its keyed floor."""
        sched = self._schedule
        if sched is None:
            return True
        if self._due[0] == step:
            return self._due[1]
        if step < WARMUP_STEPS or keyed_draw(self._key, UNIT, step) < 1.0 / SPARSEST:
            on = True
        else:
            try:
                on = UNIT in sched.runs(step)
            except Exception:  # a schedule that cannot answer: run (fail closed)
                on = True
        self._due = (step, on)
        if on:
            self.ran.append(step)
        return on

    def _objects(self, guard: Any) -> list[Any]:
        found = [guard, guard.sink, guard.recorder, guard.fp, *self._checks]
        found += [getattr(guard, "schedule", None), getattr(guard.direction, "probe", None)]
        for check in self._lanes:  # a further optimizer's lane runs checks of its own
            inner = _inner(check)
            found += [*inner, *(getattr(c, "probe", None) for c in inner)]
        return [o for o in found if o is not None]

    def _unchanged(self, guard: Any) -> bool:
        """The common case, all of :meth:`problems`'s comparisons at C speed (map over
        ``operator.is_``): True when nothing changed; False sends :meth:`problems` to
        name what did.  The guard's fixed cost per step (budget mode) is mostly this."""
        pinned = self._pinned
        now = map(getattr, repeat(guard, len(pinned)), pinned, repeat(None, len(pinned)))
        if not all(map(operator.is_, now, pinned.values())):
            return False
        checks = pinned["checks"]
        if len(checks) != len(self._checks) or not all(map(operator.is_, checks, self._checks)):
            return False
        phases = pinned["_phase"] or {}
        for name, was in self._phases.items():
            now_phase = phases.get(name, ())
            if len(now_phase) != len(was) or not all(map(operator.is_, now_phase, was)):
                return False
        if not all(map(operator.eq, map(_keys, self._objs), self._keys)):
            return False
        objects = self._objects(guard)
        if len(objects) != len(self._objs) or not all(map(operator.is_, objects, self._objs)):
            return False
        for owner, held, states in self._indices.values():
            if vars(owner).get("index") is not held or len(held) < len(states):
                return False
            for k, (t, n, v) in states.items():
                if held.get(k) is not t or t._version != v or t.numel() != n:
                    return False
        return not self._before and self._own.unchanged()

    def problems(self) -> list[str]:
        guard = self._guard()
        if guard is None or self._unchanged(guard):
            return []
        found = [
            f"guard.{name} was replaced"
            for name, value in self._pinned.items()
            if getattr(guard, name, None) is not value
        ]
        checks = self._pinned["checks"]
        if len(checks) != len(self._checks) or any(
            a is not b for a, b in zip(checks, self._checks, strict=False)
        ):
            found.append(f"guard.checks changed ({len(self._checks)} -> {len(checks)} checks)")
        phases = self._pinned["_phase"] or {}
        for name, was in self._phases.items():
            now = phases.get(name, ())
            if len(now) != len(was) or any(a is not b for a, b in zip(now, was, strict=False)):
                found.append(f"guard._phase[{name!r}] changed")
        for o, keys in zip(self._objs, self._keys, strict=True):
            if keys is None or vars(o).keys() == keys:
                continue
            extra = _shadows(o) - self._shadows.get(id(o), frozenset())
            found += [f"{type(o).__name__}.{n} shadowed by an instance attribute" for n in extra]
        if self._objects(guard) != list(self._objs):
            found.append("the guard's sink, recorder, fingerprinter, schedule or probe changed")
        for label, (owner, held, states) in self._indices.items():
            if vars(owner).get("index") is not held or any(
                held.get(k) is not t or t._version != v or t.numel() != n
                for k, (t, n, v) in states.items()
            ):
                found.append(f"{label} sample indices changed")
        found += self._own_changes()
        return found

    def _own_changes(self) -> list[str]:
        """trainguard's module state that changed (ownstate.py); a table that only grew
        or a global added is taken as the new state."""
        found = [f"{name} changed before watch()" for name in self._before]
        self._before = []
        if not self._own.unchanged():
            found += [f"{name} changed" for name in self._own.changes(grow=True)]
            self._own = ownstate.Snapshot()  # each change reported once
        return found

    def verify(self, step: int, rank: int) -> None:
        """Report what changed since start-up (each finding once); in budget mode at the
        steps :meth:`due` says, its time charged to its unit."""
        if not self.due(step):
            return
        started = clock.now()
        try:
            found = self.problems()
        finally:
            if self._schedule is not None:
                # A schedule that cannot take it leaves the cost unknown; the check ran.
                with contextlib.suppress(Exception):
                    self._schedule.charge(UNIT, clock.now() - started)
        fresh = [p for p in found if p not in self._reported]
        if not fresh:
            return
        self._reported.update(fresh)
        alert = Alert.of(
            "TG1304",
            step,
            rank,
            f"the guard itself was tampered with: {'; '.join(fresh[:5])}",
            {"functions": ["trainguard guard"], "guard": fresh[:50]},
            Severity.CRITICAL,
        )
        self._alerts.append(alert)
        log.critical("trainguard: step %d rank %d: TG1304 %s", step, rank, alert.message)
        payload = {
            "rule": alert.rule,
            "severity": str(alert.severity),
            "message": alert.message,
            "evidence": dict(alert.evidence),
        }
        self._append("alert", payload, step)
        if callable(self._on_alert):
            self._on_alert(alert)
        elif self._on_alert == "stop":
            raise TrainingStopped([alert])


def _keys(o: Any) -> Any:
    """``o``'s instance attribute names as :class:`SelfCheck` compares them (None: no
    ``__dict__``, as taken at start)."""
    return vars(o).keys() if hasattr(o, "__dict__") else None


def _shadows(o: Any) -> frozenset[str]:
    """Instance attributes of ``o`` that shadow a callable of its class."""
    cls = type(o)
    try:
        names = list(vars(o))
    except TypeError:  # no __dict__ (slots): nothing can shadow
        return frozenset()
    return frozenset(n for n in names if callable(getattr(cls, n, None)))


def _inner(check: Any) -> list[Any]:
    """The checks a check runs itself (monitor/optimizers.py ``Lane``), read from the
    list it runs each time: emptying it changes what this returns."""
    held = vars(check).get("checks") if hasattr(check, "__dict__") else None
    return list(held) if isinstance(held, list) else []


def _state(t: Any) -> tuple[Any, int, int]:
    return t, int(t.numel()), int(t._version)  # the tensor itself: its id cannot be reused


Indexed = tuple[Any, dict[Any, Any], dict[Any, tuple[Any, int, int]]]


def _indices(objects: list[Any]) -> dict[str, Indexed]:
    """Each object's ``index`` (sample indices by parameter): its owner, the dict, and the
    state of its tensors."""
    out: dict[str, Indexed] = {}
    for o in objects:
        held = vars(o).get("index") if hasattr(o, "__dict__") else None
        if isinstance(held, dict) and all(hasattr(t, "_version") for t in held.values()):
            label = type(o).__name__
            label = label if label not in out else f"{label} #{len(out)}"  # a lane's own
            out[label] = (o, held, {k: _state(t) for k, t in held.items()})
    return out


# trainguard.monitor's module state as import left it (monitor/__init__.py takes it).
_AT_IMPORT: list[ownstate.Snapshot] = []


def take_own_state() -> None:
    """Record trainguard.monitor's module state (at import, before any training code)."""
    if not _AT_IMPORT:
        _AT_IMPORT.append(ownstate.Snapshot())


def _own_state() -> tuple[ownstate.Snapshot, list[str]]:
    """The state a guard holds its modules to, and what changed since import other than
    growth (a model registered, a cache filled, a module imported since)."""
    take_own_state()
    before = _AT_IMPORT[0]
    if before.unchanged() and before.modules.keys() == ownstate.modules().keys():
        return before, []
    return ownstate.Snapshot(), before.changes(grow=True)


# Each guard's self-check, looked up by the guard (never through an attribute of it).
_checks: weakref.WeakKeyDictionary[Any, SelfCheck] = weakref.WeakKeyDictionary()


def watch_self(guard: Any) -> None:
    """Take the guard's structure as it is now (the end of ``watch()``)."""
    _checks[guard] = SelfCheck(guard)


def verify(guard: Any, step: int, rank: int) -> None:
    found = _checks.get(guard)
    if found is not None:
        found.verify(step, rank)
