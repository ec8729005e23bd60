"""The training machinery was patched (TG1304); see monitor/identity.py.

At start-up: hooks from outside torch and trainguard, and functions on torch's
routes from outside installed code, are reported (high when they can change
gradients or the update, medium for hooks that only see activations).  During
the run: any route whose objects are no longer the ones it started with.
"""

from __future__ import annotations

from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import identity, upstream
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class IdentityCheck(Check):
    core = True  # its failure leaves the step unverified: high at once (safety.py)
    unit = "identity"

    def __init__(
        self, model: Any, optimizer: Any, dataloader: Any = None, loss_fn: Any = None
    ) -> None:
        self.routes = identity.routes(model, optimizer, dataloader)
        # What makes the gradient before the parameters: the criterion, the model's
        # autograd Functions (monitor/upstream.py).
        self.routes += upstream.routes(model, loss_fn)
        self.snapshot = identity.digest(self.routes)

    def hold(self, routes: list[identity.Route]) -> None:
        """Hold these routes too from now on (taken already): an integration's own
        (monitor/integrations.py: the HF Trainer's loss, known when training starts)."""
        self.routes += routes

    def rebaseline(self) -> None:
        """Accept what is installed now (the guard itself changed a hook registry)."""
        for r in self.routes:
            r.take()

    def start(self, ctx: Context) -> list[Alert]:
        alerts = []
        for label, what, gradients in identity.audit(self.routes):
            severity = Severity.HIGH if gradients else Severity.MEDIUM
            alerts.append(
                ctx.alert(
                    "TG1304",
                    f"installed before watch() started: {label}: {what}",
                    severity=severity,
                    functions=[label],
                    at_start=True,
                )
            )
        return alerts

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        changed = identity.changed(self.routes)
        if not changed:
            return []
        return [
            ctx.alert("TG1304", f"patched at run time: {', '.join(changed)}", functions=changed)
        ]
