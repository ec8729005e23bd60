"""The update contradicts the gradient (TG1306); see monitor/direction.py."""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.direction import DirectionCheck


class UpdateDirectionCheck(Check):
    unit = "direction"

    def __init__(self, params: list[tuple[str, Any]], optimizer: Any, key: bytes) -> None:
        self.optimizer = optimizer
        self.probe = DirectionCheck(params, key)
        self.cosine: float | None = None

    def before_step(self, ctx: Context) -> list[Alert]:
        flipped = self.probe.before_step()
        if not flipped:
            return []
        return [
            ctx.alert(
                "TG1306",
                f"gradients of {len(flipped)} tensor(s) changed sign between "
                f"backward and optimizer.step (clipping only shrinks them): "
                f"{', '.join(flipped[:5])}",
                tensors=flipped[:50],
            )
        ]

    def skipped(self, ctx: Context) -> list[Alert]:
        self.cosine = None
        self.probe.skip()
        return []

    def after_step(self, ctx: Context) -> list[Alert]:
        self.cosine = cosine = self.probe.after_step(self.optimizer)
        if self.probe.mismatch is not None:  # the step's math (monitor/direction.py)
            return [ctx.alert("TG1306", self.probe.mismatch, cosine=cosine)]
        if cosine is None or cosine >= 0:
            return []
        return [
            ctx.alert(
                "TG1306",
                f"the update points against the direction "
                f"{type(self.optimizer).__name__} prescribes (cosine {cosine:.3f})",
                cosine=cosine,
            )
        ]

    def close(self) -> None:
        self.probe.remove()
