"""Optimizer hyper-parameters and the learning-rate schedule (TG1303).

Between two steps the param groups' settings must not change, except where
the schedule explains it: the registered scheduler's recomputed schedule
(monitor/schedule.py), or a value the loop declares with ``guard.step(lr=...)``
or ``guard.step(hyper={"weight_decay": wd})`` (any setting: a weight-decay or
momentum schedule written into the param groups, as DINO does).  A change is
therefore judged when ``guard.step`` is called (the declaration comes after the
optimizer step), at the step it happened.  A declared change other than the
learning rate is recorded (TG1316, info) with its old and new value.  The
scheduler's own settings (gamma, base_lrs, ...) must still equal those of the
recomputed copy.  The settings a replayable schedule drives (the learning rate;
momentum or betas where it cycles them) must equal what it gives for *this* step at
every check, whether or not they changed: a learning rate held at the last step's
value across a decay boundary did not change, and is still wrong.  A value the loop
declares is accepted and the copy goes on from it (monitor/schedule.py).

A param group added through ``optimizer.add_param_group`` (gradual unfreezing)
holds every key of the optimizer's defaults, which ``add_param_group`` fills in;
the parameter check records it (TG1316).  Groups removed, or appended without
the defaults, are TG1303.

In budget mode the check is the schedule's unit ``hyper``: the param groups are
compared at the steps it draws, against those its last run saw.  What the loop
declared at the skipped steps in between (the last value per group and key) counts
as declared at the drawn step, so a change declared only at the step it was made is
still honest; an undeclared change that stays is found at the next drawn step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.checks.scheduler import DECLARED, ScheduleWatch
from trainguard.monitor.fingerprint import hyperparameters
from trainguard.monitor.forwards import declared_names
from trainguard.monitor.schedule import ScheduleModel, Schedulers, as_list

LR_KEYS = ("lr", "initial_lr")


class HyperparameterCheck(Check):
    core = True  # its failure leaves the step unverified: high at once (safety.py)
    unit = "hyper"  # budget mode: both step hooks at the steps the schedule draws

    def __init__(self, optimizer: Any, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.schedule: ScheduleModel | None = None
        # The schedulers' functions, step calls and state (checks/scheduler.py).
        self.watch: ScheduleWatch | None = None
        self._follow_schedulers(scheduler)
        self.groups = hyperparameters(optimizer)
        # Changes awaiting guard.step: (group, key, old, new, the schedule's value or None)
        self._held: list[tuple[int, str, Any, Any, Any]] = []
        self._declared: dict[str, Any] = {}  # guard.step(hyper=...) for the coming step_end
        # The keys of the declared changes the last step_end recorded (TG1316): the step
        # record carries them (``hyper_changed``), which replay's schedule witness reads.
        self.changed_keys: list[str] = []
        # lr= naming the rate the loop set after optimizer.step, for the next step (the
        # groups held it at guard.step): per group, judged at the next step.
        self._ahead: dict[int, float] = {}
        # Budget mode: at a skipped step (``skipped``), each group's learning rate for the
        # step record, and what the loop declared since the last run (per group: lr; per
        # key: the hyper= value), which counts as declared at the next run.
        self._lrs: list[Any] | None = None
        self._skipping = self._fresh = False
        self._lr_since: dict[int, float] = {}
        self._said_since: dict[str, Any] = {}

    def _follow_schedulers(self, scheduler: Any) -> None:
        if self.schedule is not None:
            self.schedule.release()
        self.schedule = self.watch = None
        if as_list(scheduler):
            self.schedule = ScheduleModel(scheduler, self.optimizer)
            self.watch = ScheduleWatch(self.schedule)

    def declare(self, hyper: Mapping[str, Any] | None) -> None:
        """What ``guard.step(hyper=...)`` says the loop set at this step: a value for every
        group, or a list with one per group."""
        self._declared = dict(hyper or {})

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        now = hyperparameters(self.optimizer)
        if self.schedule is not None and self.schedule.behind():
            self._ahead = {}  # a scheduler stepped after guard.step: the rate is its
        expected = self.schedule.expected() if self.schedule is not None else None
        alerts: list[Alert] = []
        driven = self.schedule.driven() if self.schedule is not None else set()
        for i, (old, new) in enumerate(zip(self.groups, now, strict=False)):
            for k in sorted(set(old) | set(new)):
                given = expected[i].get(k) if expected is not None and i < len(expected) else None
                if given is not None and same(new.get(k), given):
                    continue  # the schedule gives it
                if old.get(k) == new.get(k) and not (k in driven and given is not None):
                    continue  # unchanged, and no schedule says what it must be now
                self._held.append((i, k, old.get(k), new.get(k), given))  # judged at guard.step
        if len(now) != len(self.groups) and not self._added(now):
            alerts.append(
                ctx.alert("TG1303", f"param groups changed from {len(self.groups)} to {len(now)}")
            )
        return alerts

    def _added(self, now: list[dict[str, Any]]) -> bool:
        """Groups only appended, each through add_param_group (it fills in the defaults)."""
        defaults = set(getattr(self.optimizer, "defaults", {}) or {})
        return len(now) > len(self.groups) and all(
            defaults <= set(g) for g in now[len(self.groups) :]
        )

    def after_step(self, ctx: Context) -> list[Alert]:
        self.groups = hyperparameters(self.optimizer)
        self._lrs, self._fresh = None, True
        return []

    def skipped(self, ctx: Context) -> list[Alert]:
        """Budget mode, a step the schedule leaves out: only the learning rates this step
        runs with (for its record; the groups are compared at the next drawn step)."""
        self._lrs = [g.get("lr") for g in self.optimizer.param_groups]
        self._skipping = True
        if self.schedule is not None:
            self.schedule.catch_up()  # what the copy replays at guard.step came after this
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        held, self._held = self._held, []
        said, self._declared = self._declared, {}
        declared = end.declared_lr
        if self._skipping:  # budget mode: carried to the next run (never in exact mode)
            self._lr_since.update(enumerate(declared or []))
            self._said_since.update(said)
            if self._lrs is not None and self.schedule is not None:
                for i, d in enumerate(declared or []):  # the rate the step ran with
                    if i < len(self._lrs) and close(self._lrs[i], d):
                        self._follow(i, "lr", self._lrs[i])
        lr_since, said_since = self._lr_since, self._said_since
        ahead, self._ahead = self._ahead, {}
        alerts: list[Alert] = []
        recorded = []
        for i, k, old, new, given in held:
            lr = new if k == "lr" else None
            if declared is not None and k == "lr" and i < len(declared) and close(lr, declared[i]):
                self._follow(i, k, new)
                continue
            if k == "lr" and i in ahead and close(lr, ahead[i]):
                self._follow(i, k, new)
                continue  # declared at the last guard.step as the rate set for this step
            if k == "lr" and i in lr_since and close(lr, lr_since[i]):
                self._follow(i, k, new)
                continue  # declared at a step the unit skipped
            if (declared is not None or lr_since or ahead) and k == "initial_lr":
                continue  # follows the declared lr
            if k in said and same(new, _for_group(said[k], i)):
                recorded.append({"group": i, "key": k, "old": old, "new": new})
                self._follow(i, k, new)
                continue
            if k in said_since and same(new, _for_group(said_since[k], i)):
                recorded.append({"group": i, "key": k, "old": old, "new": new})
                self._follow(i, k, new)
                continue
            told = declared[i] if declared is not None and i < len(declared) else None
            alerts.append(_changed(ctx, i, k, old, new, given, told))
        for i, g in enumerate(self.optimizer.param_groups):
            if declared is not None and i < len(declared) and close(g.get("lr"), declared[i]):
                self._ahead[i] = declared[i]  # also the rate the next step runs with
        # At every step, also those budget mode skips: microseconds (checks/scheduler.py).
        # After the declared rates are followed: the calls made since this step's pre-hook
        # go on from them, on the copy as on the real schedulers.
        if self.watch is not None:
            alerts += self.watch.check(ctx, end)
            if self.watch.declared:
                self._switch(end)
        if self._fresh:  # the groups were taken again: what was declared before is judged
            self._lr_since, self._said_since = {}, {}
        self._skipping = self._fresh = False
        self.changed_keys = sorted({str(r["key"]) for r in recorded})
        if recorded:
            keys = self.changed_keys
            alerts.append(
                ctx.alert(
                    "TG1316",
                    f"declared hyper-parameter change ({', '.join(keys)}) in "
                    f"{len({r['group'] for r in recorded})} param group(s)",
                    severity=Severity.INFO,
                    key=keys,
                    changes=recorded[:50],
                )
            )
        return alerts

    def _switch(self, end: StepEnd) -> None:
        """``changed=["scheduler"]``: the schedule changed on purpose, a new copy from
        here; ``changed={"scheduler": new}`` (SWALR taking over): the guard follows the
        schedulers given (those stepping this optimizer) from here instead."""
        given = declared_names(end.declared_changes).get(DECLARED)
        mine = [s for s in as_list(given) if getattr(s, "optimizer", None) is self.optimizer]
        if mine:
            self._follow_schedulers(mine[0] if len(mine) == 1 else Schedulers(mine))
        elif self.schedule is not None:
            self.schedule.resync()

    def close(self) -> None:
        if self.schedule is not None:
            self.schedule.release()  # the schedulers' own classes back

    def _follow(self, i: int, k: str, value: Any) -> None:
        """A declared value: the schedule's copy goes on from it."""
        if self.schedule is not None:
            self.schedule.follow(i, k, value)

    def lrs(self) -> list[Any]:
        """Each group's learning rate after the last step (for the step record)."""
        if self._lrs is not None:  # budget mode, a skipped step: read at its pre-hook
            return list(self._lrs)
        return [g.get("lr") for g in self.groups]


def _for_group(value: Any, i: int) -> Any:
    """A declared value for group ``i``: a list holds one per group, anything else is all."""
    if isinstance(value, list):
        return value[i] if i < len(value) else None
    return list(value) if isinstance(value, tuple) else value  # betas: settings hold lists


def _changed(
    ctx: Context, i: int, k: str, old: Any, new: Any, given: Any = None, told: Any = None
) -> Alert:
    what = f"changed from {old!r} to {new!r}" if old != new else f"stayed {new!r}"
    if given is not None:
        what += f" where the schedule gives {given!r}"
    if k == "lr" and told is not None:
        what += (
            f"; guard.step(lr={told!r}) declared another rate: lr= is the rate this step ran "
            f"with ({new!r}, set before optimizer.step) or the rate the loop set after "
            "optimizer.step, for the next step (the groups hold it when guard.step is called)"
        )
    elif k == "lr":
        what += (
            f"; not declared (a rate the loop sets itself: guard.step(lr={new!r}) at this "
            "step, or at the step before if it set it after optimizer.step)"
        )
    elif old is None:
        what += (
            f" (a setting new to the group, as a scheduler made mid-run adds: "
            f"guard.step(hyper={{{k!r}: {new!r}}}), or changed={{'scheduler': it}} to follow it)"
        )
    return ctx.alert(
        "TG1303",
        f"param group {i}: {k} {what}",
        group=i,
        key=k,
        old=old,
        new=new,
        **({"expected": given} if given is not None else {}),
    )


def close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(float(a) - b) <= 1e-12 + 1e-9 * abs(b)


def same(a: Any, b: Any) -> bool:
    """Equal settings, numbers up to rounding (lists of numbers elementwise)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return close(a, float(b))
    return bool(a == b) and b is not None
