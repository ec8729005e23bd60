"""Optimizer hyper-parameters changed between steps (TG1303).

A change the registered scheduler explains (its last learning rate) is normal;
so is a learning rate the loop declares with ``guard.step(lr=...)``.  Anything
else (betas, eps, weight decay, momentum, a new key, a new param group, a
learning rate nobody declared) is an alert.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.fingerprint import hyperparameters


class HyperparameterCheck(Check):
    def __init__(self, optimizer: Any, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.groups = hyperparameters(optimizer)

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        now = hyperparameters(self.optimizer)
        scheduled = None
        if self.scheduler is not None and hasattr(self.scheduler, "get_last_lr"):
            scheduled = [float(x) for x in self.scheduler.get_last_lr()]
        alerts = []
        for i, (old, new) in enumerate(zip(self.groups, now, strict=False)):
            for k in sorted(set(old) | set(new)):
                if old.get(k) == new.get(k):
                    continue
                if (
                    k in ("lr", "initial_lr")
                    and scheduled is not None
                    and i < len(scheduled)
                    and close(new.get("lr"), scheduled[i])
                ):
                    continue  # the registered scheduler set it
                alerts.append(
                    ctx.alert(
                        "TG1303",
                        f"param group {i}: {k} changed from {old.get(k)!r} to {new.get(k)!r}",
                        group=i,
                        key=k,
                        old=old.get(k),
                        new=new.get(k),
                    )
                )
        if len(now) != len(self.groups):
            alerts.append(
                ctx.alert("TG1303", f"param groups changed from {len(self.groups)} to {len(now)}")
            )
        return alerts

    def after_step(self, ctx: Context) -> list[Alert]:
        self.groups = hyperparameters(self.optimizer)
        return []

    def lrs(self) -> list[Any]:
        """Each group's learning rate after the last step (for the step record)."""
        return [g.get("lr") for g in self.groups]


def close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(float(a) - b) <= 1e-12 + 1e-9 * abs(b)
