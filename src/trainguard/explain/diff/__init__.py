"""``trainguard diff``: compare two checkpoints tensor by tensor, value by value."""

from trainguard.explain.diff.core import DiffReport, TensorDiff, ValueDiff, diff

__all__ = ["DiffReport", "TensorDiff", "ValueDiff", "diff"]
