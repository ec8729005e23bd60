"""Robust running statistics for step times, losses and gradient norms.

Median and MAD over a sliding window: one slow step or one odd loss does not
move them, so a spike stands out without a Gaussian assumption.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

# Budget mode: values added between two medians of a window (a sort of the window at
# every step, for each of the guard's windows, was a fixed cost of every step there).
BUDGET_REFRESH = 16


class RobustWindow:
    def __init__(self, size: int = 64, warmup: int = 16, refresh: int = 1) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.warmup = warmup
        # The median is taken again once ``refresh`` values were added since the last
        # one: 1 (exact mode) is the window's median as it is; budget mode's may be up to
        # BUDGET_REFRESH - 1 values behind it.
        self.refresh = refresh
        self._median: float | None = None
        self._since = 0  # values added since the last median

    def ready(self) -> bool:
        return len(self.values) >= self.warmup

    def median(self) -> float:
        if self._median is None or self._since >= self.refresh:
            self._median, self._since = statistics.median(self.values), 0
        return self._median

    def center_scale(self) -> tuple[float, float]:
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values)
        return med, 1.4826 * mad

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(value)
            self._since += 1


def is_stall(window: RobustWindow, value: float, *, min_excess: float) -> bool:
    """A step much slower than usual: several scales above the median, 3x it, and by
    at least ``min_excess`` seconds (so a GC pause on a 5 ms step is not a stall)."""
    if not window.ready():
        return False
    med = window.median()
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
    med = window.median()
    if not abs(value) > 3 * abs(med):
        return False  # the common case, without the second median (the MAD)
    _, scale = window.center_scale()
    return abs(value - med) > 12 * max(scale, 0.05 * abs(med), 1e-12)
