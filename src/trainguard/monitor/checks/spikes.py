"""Loss or gradient norm far outside its recent range (TG1308); see monitor/stats.py."""

from __future__ import annotations

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.stats import RobustWindow, is_spike


class SpikeCheck(Check):
    def __init__(self, losses: RobustWindow, grad_norms: RobustWindow) -> None:
        self.losses = losses
        self.grad_norms = grad_norms

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        alerts = []
        if end.loss is not None:
            if is_spike(self.losses, end.loss):
                alerts.append(
                    ctx.alert(
                        "TG1308",
                        f"loss {end.loss:.4g} is far outside its recent range",
                        loss=end.loss,
                    )
                )
            self.losses.add(end.loss)
        if end.grad_norm is not None:  # None: not measured and not passed to guard.step
            if is_spike(self.grad_norms, end.grad_norm):
                alerts.append(
                    ctx.alert(
                        "TG1308",
                        f"gradient norm {end.grad_norm:.4g} is far outside its recent range",
                        grad_norm=end.grad_norm,
                    )
                )
            self.grad_norms.add(end.grad_norm)
        return alerts
