"""Bounded time series for the run report: a million steps plot from a few thousand points.

A :class:`Series` keeps at most :data:`MAX_BUCKETS` buckets.  Each bucket holds
the lowest and the highest value of the consecutive points it covers (with
their steps), so a one-step spike survives any amount of thinning: a chart
drawn through each bucket's two extremes shows every excursion a full-resolution
chart would.  When the buckets run out, neighbours are merged in pairs and
each new bucket covers twice as many points.  Non-finite values (a NaN loss)
are counted apart, with the steps of the first few.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_BUCKETS = 1024  # per series (even): a chart gets at most twice this many points
MAX_NONFINITE_STEPS = 50  # steps of non-finite values kept (the rest are counted)


@dataclass
class Bucket:
    lo_step: int
    lo: float
    hi_step: int
    hi: float

    def add(self, step: int, value: float) -> None:
        if value < self.lo:
            self.lo_step, self.lo = step, value
        if value > self.hi:
            self.hi_step, self.hi = step, value

    def merge(self, other: Bucket) -> None:
        self.add(other.lo_step, other.lo)
        self.add(other.hi_step, other.hi)


@dataclass
class Series:
    """One metric of one rank, thinned to at most :data:`MAX_BUCKETS` buckets."""

    buckets: list[Bucket] = field(default_factory=list)
    per_bucket: int = 1  # points each full bucket covers
    count: int = 0  # finite points seen
    nonfinite: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    _filled: int = 0  # points in the last bucket

    def add(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            self.nonfinite += 1
            if len(self.nonfinite_steps) < MAX_NONFINITE_STEPS:
                self.nonfinite_steps.append(step)
            return
        self.count += 1
        if self.first is None:
            self.first = value
        self.last = value
        if self.buckets and self._filled < self.per_bucket:
            self.buckets[-1].add(step, value)
            self._filled += 1
            return
        if len(self.buckets) >= MAX_BUCKETS:
            self._halve()
        self.buckets.append(Bucket(step, value, step, value))
        self._filled = 1

    def _halve(self) -> None:
        # Only called when every bucket is full and their number (MAX_BUCKETS) is even.
        for left, right in zip(self.buckets[::2], self.buckets[1::2], strict=True):
            left.merge(right)
        self.buckets = self.buckets[::2]
        self.per_bucket *= 2
        self._filled = self.per_bucket

    def points(self) -> list[tuple[int, float]]:
        """The points to draw, in order: each bucket's extremes (one, if they coincide)."""
        out: list[tuple[int, float]] = []
        for b in self.buckets:
            first, second = sorted(((b.lo_step, b.lo), (b.hi_step, b.hi)))
            out.append(first)
            if second != first:
                out.append(second)
        return out

    @property
    def lowest(self) -> float | None:
        return min((b.lo for b in self.buckets), default=None)

    @property
    def highest(self) -> float | None:
        return max((b.hi for b in self.buckets), default=None)
