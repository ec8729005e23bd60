"""What a watch check reports: alerts with a rule, a typed severity and evidence.

Checks build alerts through :class:`Context`, which knows the step and rank, so
a check never needs the guard itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.findings import Severity
from trainguard.rules import RULES


@dataclass(frozen=True)
class Alert:
    """One alert; ``count`` > 1 when several occurrences in one window were folded into it."""

    rule: str
    step: int
    rank: int
    message: str
    severity: Severity
    evidence: Mapping[str, Any] = field(default_factory=dict)
    count: int = 1

    @classmethod
    def of(
        cls,
        rule: str,
        step: int,
        rank: int,
        message: str,
        evidence: Mapping[str, Any],
        severity: Severity | None = None,
    ) -> Alert:
        """An alert at ``severity``, or at its rule's default severity when None."""
        # INFO is 0: "severity or default" would turn a requested INFO into the default.
        chosen = severity if severity is not None else RULES[rule].severity
        return cls(rule, step, rank, message, chosen, evidence)


class TrainingStopped(TrainguardError):
    """Raised by ``guard.step`` when ``on_alert="stop"`` and an alert fired."""

    def __init__(self, alerts: list[Alert]) -> None:
        self.alerts = alerts
        first = alerts[0]
        super().__init__(f"training stopped at step {first.step}: {first.rule} {first.message}")


@dataclass(frozen=True)
class Context:
    """Where a check runs: the step it is about, the rank, and whether a full check is due.

    ``due`` is False on the steps that ``every`` skips in exact mode; in budget mode the
    cheap checks run at every step (``due`` True) while full fingerprints follow the
    budget's own schedule.
    """

    step: int
    rank: int
    due: bool = True

    def alert(
        self, rule: str, message: str, *, severity: Severity | None = None, **evidence: Any
    ) -> Alert:
        return Alert.of(rule, self.step, self.rank, message, evidence, severity)
