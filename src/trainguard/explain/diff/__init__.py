"""``trainguard diff``: compare two checkpoints tensor by tensor, value by value."""

from trainguard.explain.diff.core import diff
from trainguard.explain.diff.result import DiffReport, TensorDiff, ValueDiff

__all__ = ["DiffReport", "TensorDiff", "ValueDiff", "diff"]
