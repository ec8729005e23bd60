"""The Python environment differs from a sealed snapshot at start-up (TG1312)."""

from __future__ import annotations

import os
from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class EnvironmentCheck(Check):
    def __init__(self, snapshot_path: Any, public_key: Any, paths: list[str] | None) -> None:
        self.snapshot_path = os.fspath(snapshot_path)
        self.public_key = public_key
        self.paths = paths
        self.summary: dict[str, Any] | None = None  # what the run-start record says

    def start(self, ctx: Context) -> list[Alert]:
        from trainguard.env.verify import check_against

        bad = check_against(self.snapshot_path, self.public_key, self.paths)
        self.summary = {"snapshot": os.path.basename(self.snapshot_path), "differing": len(bad)}
        if not bad:
            return []
        return [
            ctx.alert(
                "TG1312",
                f"{len(bad)} file(s) differ from the sealed environment: "
                + "; ".join(f"{f.file}: {f.rule}" for f in bad[:5]),
                files=[f.file for f in bad[:50]],
            )
        ]
