"""Where a guard's alerts go: its list, the log, the ledger, and the user's handler."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from trainguard.monitor.alerts import Alert
from trainguard.monitor.options import AlertHandler, OnAlert

log = logging.getLogger("trainguard.monitor")


class AlertSink:
    def __init__(
        self, record: Callable[[str, dict[str, Any]], None], on_alert: OnAlert | AlertHandler
    ) -> None:
        self._record = record
        self.on_alert = on_alert
        self.alerts: list[Alert] = []
        self.stopped: list[Alert] = []  # on_alert="stop": raised by the next guard.step

    def raise_all(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self.alerts.append(alert)
            log.warning(
                "trainguard: step %d rank %d: %s %s",
                alert.step,
                alert.rank,
                alert.rule,
                alert.message,
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

    def take_stopped(self) -> list[Alert]:
        stopped, self.stopped = self.stopped, []
        return stopped
