"""Where a guard's alerts go: its list, the log, the ledger, and the user's handler.

Alerts are aggregated: the first alert of a rule, severity and group (the
tensors, functions, param group... its evidence names) in a window of
:data:`WINDOW_STEPS` steps is reported in full; repeats in that window only
raise its ``count``.  When the window ends (or the run does), one
``alert-repeats`` ledger record keeps the steps they happened at, so the
evidence stays in the ledger without a flood of records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from trainguard.monitor.alerts import Alert
from trainguard.monitor.options import AlertHandler, OnAlert

log = logging.getLogger("trainguard.monitor")

WINDOW_STEPS = 100
MAX_STEPS_KEPT = 1000  # steps listed per alert-repeats record
# Evidence keys that say *what* an alert is about (the others say how much).
GROUP_KEYS = (
    "tensors",
    "functions",
    "group",
    "key",
    "generator",
    "index",
    "ranks",
    "phase",
    "optimizer",
)


def group_of(alert: Alert) -> str:
    picked = {k: alert.evidence[k] for k in GROUP_KEYS if k in alert.evidence}
    return f"{alert.rule}|{alert.severity}|{json.dumps(picked, sort_keys=True, default=str)}"


class AlertSink:
    def __init__(
        self,
        record: Callable[[str, dict[str, Any]], None],
        on_alert: OnAlert | AlertHandler,
        tag: Callable[[list[Alert]], list[Alert]] | None = None,
    ) -> None:
        self._record = record
        # Several optimizers: names the one an alert is about (monitor/optimizers.py).
        self.tag = tag
        self.on_alert = on_alert
        self.alerts: list[Alert] = []
        self.stopped: list[Alert] = []  # on_alert="stop": raised by the next guard.step
        # group -> (index in self.alerts, steps of the repeats)
        self._open: dict[str, tuple[int, list[int]]] = {}

    def raise_all(self, alerts: list[Alert]) -> None:
        if self.tag is not None and alerts:
            alerts = self.tag(alerts)
        for alert in alerts:
            group = group_of(alert)
            found = self._open.get(group)
            if found is not None:
                index, steps = found
                first = self.alerts[index]
                if alert.step - first.step < WINDOW_STEPS:
                    self.alerts[index] = dataclasses.replace(first, count=first.count + 1)
                    if len(steps) < MAX_STEPS_KEPT:
                        steps.append(alert.step)
                    continue
                self._flush(group)
            self._open[group] = (len(self.alerts), [])
            self._report(alert)

    def _report(self, alert: Alert) -> None:
        self.alerts.append(alert)
        log.warning(
            "trainguard: step %d rank %d: %s %s", alert.step, alert.rank, alert.rule, alert.message
        )
        payload = {
            "rule": alert.rule,
            "severity": str(alert.severity),
            "message": alert.message,
            "evidence": dict(alert.evidence),
        }
        self._record("alert", payload)
        if callable(self.on_alert):
            self.on_alert(alert)
        elif self.on_alert == "stop":
            self.stopped.append(alert)

    def _flush(self, group: str) -> None:
        index, steps = self._open.pop(group)
        if steps:
            first = self.alerts[index]
            self._record(
                "alert-repeats",
                {
                    "rule": first.rule,
                    "severity": str(first.severity),
                    "first_step": first.step,
                    "count": first.count,
                    "steps": steps,
                    "message": first.message,
                },
            )

    def flush(self) -> None:
        """Write the repeats of every open window (at close)."""
        for group in list(self._open):
            self._flush(group)

    def take_stopped(self) -> list[Alert]:
        stopped, self.stopped = self.stopped, []
        return stopped
