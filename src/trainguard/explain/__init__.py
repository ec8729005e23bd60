"""Explain what happened to a run: checkpoint forensics (``diff``)."""

from trainguard.explain.diff import DiffReport, TensorDiff, ValueDiff, diff

__all__ = ["DiffReport", "TensorDiff", "ValueDiff", "diff"]
