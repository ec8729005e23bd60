"""The watch checks: one class per concern (see ``base.py`` for the phases)."""

from trainguard.monitor.checks.base import Check, StepEnd

__all__ = ["Check", "StepEnd"]
