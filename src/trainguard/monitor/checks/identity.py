"""The training machinery was patched at run time (TG1304); see monitor/identity.py."""

from __future__ import annotations

from typing import Any

from trainguard.monitor import identity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class IdentityCheck(Check):
    def __init__(self, optimizer: Any, dataloader: Any = None) -> None:
        self.probes = identity.probes(optimizer, dataloader)
        self.snapshot = identity.snapshot(self.probes)

    def rebaseline(self) -> None:
        """Accept what is installed now (the guard itself changed a hook registry)."""
        self.snapshot = identity.snapshot(self.probes)

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        now = identity.snapshot(self.probes)
        changed = identity.differences(self.snapshot, now)
        if not changed:
            return []
        self.snapshot = now  # report each patch once
        return [
            ctx.alert("TG1304", f"patched at run time: {', '.join(changed)}", functions=changed)
        ]
