"""Optimizer hyper-parameters and the learning-rate schedule (TG1303).

Between two steps the param groups' settings must not change, except the
learning rate where the schedule explains it: the registered scheduler's
recomputed schedule (monitor/schedule.py), or a learning rate the loop
declares with ``guard.step(lr=...)``.  A learning-rate change is therefore
judged when ``guard.step`` is called (the declaration comes after the
optimizer step); every other change at once.  The scheduler's own settings
(gamma, base_lrs, ...) must still equal those of the recomputed copy.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.fingerprint import hyperparameters
from trainguard.monitor.schedule import ScheduleModel

LR_KEYS = ("lr", "initial_lr")


class HyperparameterCheck(Check):
    def __init__(self, optimizer: Any, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.schedule = ScheduleModel(scheduler, optimizer) if scheduler is not None else None
        self.groups = hyperparameters(optimizer)
        self._held: list[tuple[int, str, Any, Any]] = []  # lr changes awaiting guard.step

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        now = hyperparameters(self.optimizer)
        expected = self.schedule.expected() if self.schedule is not None else None
        alerts = []
        if self.schedule is not None:
            changed = self.schedule.tampered()
            if changed:
                alerts.append(
                    ctx.alert(
                        "TG1303",
                        f"the scheduler's settings changed: {'; '.join(changed[:5])}",
                        key="scheduler",
                        changes=changed[:50],
                    )
                )
                self.schedule.resync()
        for i, (old, new) in enumerate(zip(self.groups, now, strict=False)):
            for k in sorted(set(old) | set(new)):
                if old.get(k) == new.get(k):
                    continue
                given = expected[i].get(k) if expected is not None and i < len(expected) else None
                if given is not None and same(new.get(k), given):
                    continue  # the schedule gives it
                if k in LR_KEYS:
                    self._held.append((i, k, old.get(k), new.get(k)))
                    continue
                alerts.append(_changed(ctx, i, k, old.get(k), new.get(k)))
        if len(now) != len(self.groups):
            alerts.append(
                ctx.alert("TG1303", f"param groups changed from {len(self.groups)} to {len(now)}")
            )
        return alerts

    def after_step(self, ctx: Context) -> list[Alert]:
        self.groups = hyperparameters(self.optimizer)
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        held, self._held = self._held, []
        declared = end.declared_lr
        alerts = []
        for i, k, old, new in held:
            lr = new if k == "lr" else None
            if declared is not None and k == "lr" and i < len(declared) and close(lr, declared[i]):
                continue
            if declared is not None and k == "initial_lr":
                continue  # follows the declared lr
            alerts.append(_changed(ctx, i, k, old, new))
        return alerts

    def lrs(self) -> list[Any]:
        """Each group's learning rate after the last step (for the step record)."""
        return [g.get("lr") for g in self.groups]


def _changed(ctx: Context, i: int, k: str, old: Any, new: Any) -> Alert:
    return ctx.alert(
        "TG1303",
        f"param group {i}: {k} changed from {old!r} to {new!r}",
        group=i,
        key=k,
        old=old,
        new=new,
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
