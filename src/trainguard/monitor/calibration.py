"""Two fixed reference measurements per step: torch's ops against plain code (TG1307).

A spin or sleep added to *every* torch op (a dispatch or function mode, a Python
kernel registered on aten ops) slows the training and the guard's own work alike:
every phase looks like a busy machine, and every rule that compares the run with
its own phases reads it as contention.  A reference that does not go through torch
does not slow with it.  Each step the guard times the same tiny work twice:

* ``torch``: a few elementwise ops on a small CPU tensor, through the dispatcher
  (every mode, every Python kernel and every profiler hook on the way applies);
* ``plain``: a BLAKE2b digest of a fixed buffer (C code, captured at import; no torch).

Contention (other processes, a slower clock, a busy SMT sibling) slows both; what
intercepts torch's ops slows only the first.  :class:`Calibration` keeps the ratio
``torch / plain`` of the first ``WARMUP`` steps and reports when the recent median
ratio is ``SLOWER`` times that on ``SUSTAINED`` of the last ``WINDOW`` steps.  A
ratio present from the first step is the baseline: interception installed before
the guard starts is not seen here (docs/watch.md says what is).
"""

from __future__ import annotations

import hashlib
import statistics
from collections import deque
from typing import Any

from trainguard.monitor import clock

_BLAKE2B = hashlib.blake2b  # captured at import, like the clocks
_BUFFER = bytes(range(256)) * 16  # 4 KiB: a few microseconds
TORCH_OPS = 4
WARMUP = 16  # steps that set the usual ratio
WINDOW = 10
SUSTAINED = 8  # steps of WINDOW whose ratio is SLOWER times the usual
SLOWER = 1.5


def plain_seconds() -> float:
    """Seconds for the reference work outside torch (after one untimed run: what is
    timed is the work with warm caches, not what the training evicted)."""
    _BLAKE2B(_BUFFER).digest()
    started = clock.now()
    _BLAKE2B(_BUFFER).digest()
    return clock.now() - started


class Calibration:
    """The ratio of torch's time to plain code's time on the same fixed work, per step."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        # Made once, on the CPU whatever device context is current.
        self._x = torch.ones(256, device="cpu")
        self.usual: float | None = None
        self._early: list[float] = []
        self.ratios: deque[float] = deque(maxlen=WINDOW)
        self.slow: deque[bool] = deque(maxlen=WINDOW)
        self.last: tuple[float, float] | None = None  # torch and plain seconds, last step
        self.reported = False  # until a whole window is back at the usual ratio

    def torch_seconds(self) -> float:
        x = self._x.add(1.0)  # untimed: warms the caches and the dispatch path
        started = clock.now()
        for _ in range(TORCH_OPS):
            x = x.add(1.0)
        return clock.now() - started

    def profiling(self) -> bool:
        """torch's profiler adds its own time to every op (honest, and on purpose)."""
        try:
            return bool(self.torch.autograd.profiler._is_profiler_enabled)
        except AttributeError:
            return False

    def measure(self) -> tuple[float, float]:
        self.last = self.torch_seconds(), plain_seconds()
        return self.last

    def judge(self, torch_s: float, plain_s: float) -> float | None:
        """Add one step's pair; the recent median ratio over the usual one when it is
        SLOWER on SUSTAINED of the last WINDOW steps, else None."""
        if plain_s <= 0 or torch_s <= 0:
            return None
        ratio = torch_s / plain_s
        if self.usual is None:
            self._early.append(ratio)
            if len(self._early) >= WARMUP:
                self.usual = statistics.median(self._early)
            return None
        self.ratios.append(ratio)
        self.slow.append(ratio > SLOWER * self.usual)
        if len(self.slow) == WINDOW and not any(self.slow):
            self.reported = False
        if self.reported or len(self.ratios) < WINDOW or sum(self.slow) < SUSTAINED:
            return None
        factor = statistics.median(self.ratios) / self.usual
        if factor <= SLOWER:
            return None
        self.reported = True  # once per episode: it lasts until the ratio is back
        return factor


def rank_pace(checks: list[Any]) -> float | None:
    """This rank's ratio for the rank comparison: the recent median, else the start-up one
    (None before the warm-up ends)."""
    for check in checks:
        cal = getattr(check, "calibration", None)
        if isinstance(cal, Calibration):
            return statistics.median(cal.ratios) if cal.ratios else cal.usual
    return None


def odd_pace(paces: dict[int, Any]) -> tuple[list[int], dict[str, float]]:
    """Ranks whose ratio is SLOWER times the median of the other ranks' (ranks of one job
    run the same torch on like machines): a rank-local interception, even one present from
    the first step.  Values that are not positive finite numbers are left out (the field
    is optional; peers are not trusted)."""
    valid = {
        r: float(v)
        for r, v in paces.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
    }
    odd = []
    for r, v in valid.items():
        others = [w for q, w in valid.items() if q != r]
        if others and v > SLOWER * statistics.median(others):
            odd.append(r)
    return sorted(odd), {str(r): round(v, 3) for r, v in valid.items()}
