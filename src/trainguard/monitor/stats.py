"""Robust running statistics for step times, losses and gradient norms.

Median and MAD over a sliding window: one slow step or one odd loss does not
move them, so a spike stands out without a Gaussian assumption.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class RobustWindow:
    def __init__(self, size: int = 64, warmup: int = 16) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.warmup = warmup

    def ready(self) -> bool:
        return len(self.values) >= self.warmup

    def center_scale(self) -> tuple[float, float]:
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values)
        return med, 1.4826 * mad

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(value)


def is_stall(window: RobustWindow, value: float, *, min_excess: float) -> bool:
    """A step much slower than usual: several scales above the median, 3x it, and by
    at least ``min_excess`` seconds (so a GC pause on a 5 ms step is not a stall)."""
    if not window.ready():
        return False
    med = statistics.median(window.values)
    if not (value > 3 * med and value - med > min_excess):
        return False  # the common case, without the second median (the MAD)
    _, scale = window.center_scale()
    return value > med + 8 * max(scale, 0.05 * med)


def is_spike(window: RobustWindow, value: float) -> bool:
    """A loss or gradient norm far outside its recent range (or not finite)."""
    if not math.isfinite(value):
        return True
    if not window.ready():
        return False
    med = statistics.median(window.values)
    if not abs(value) > 3 * abs(med):
        return False  # the common case, without the second median (the MAD)
    _, scale = window.center_scale()
    return abs(value - med) > 12 * max(scale, 0.05 * abs(med), 1e-12)
