"""Watching within an overhead budget: exact checks at unpredictable steps, cheap ones at all.

An exact fingerprint reads every weight and optimizer moment twice per step
(after step t and before step t+1); on a CPU training a large model with small
batches that is far more than 2% of the step.  ``watch(..., budget=0.02)``
keeps the per-step cost near that fraction of the median step time:

* every step, for free: each weight's and optimizer tensor's version counter
  and storage pointer are compared between the end of one step and the start
  of the next.  PyTorch bumps the version on every in-place write that autograd
  can see (``p.add_``, ``p.copy_``, ``p.detach().mul_`` under ``no_grad``...) and
  a swapped tensor or storage moves the pointer, so those edits are caught at
  once, and named (TG1301, TG1302);
* at a fraction ``p`` of step boundaries, chosen from the run's secret key so
  code without the key cannot tell which: the exact keyed fingerprints, as in
  the default mode.  This is what catches writes that bypass the version
  counter (``p.data.mul_``, a NumPy view of the storage, ctypes): a one-off
  edit at one boundary with probability ``p``, one repeated at every step
  within about ``1/p`` steps.

``p`` follows from the budget, the measured cost of a full fingerprint and the
median step time: ``p = budget * step / (2 * cost)``, at most 1.  During the
first steps (before a median exists) and at rank-comparison steps every
boundary is checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

WARMUP_STEPS = 16


def drawn(key: bytes, step: int, probability: float) -> bool:
    """Whether the boundary after ``step`` gets an exact check: a keyed, reproducible draw."""
    if probability >= 1.0:
        return True
    h = hashlib.blake2b(step.to_bytes(8, "little", signed=True), key=key[:32], digest_size=8)
    return int.from_bytes(h.digest(), "little") < probability * 2**64


def probability(budget: float, median_step: float | None, full_cost: float) -> float:
    """The share of boundaries checked exactly so that their cost is ``budget`` of a step."""
    if median_step is None or full_cost <= 0.0:
        return 1.0
    return max(0.0, min(1.0, budget * median_step / (2.0 * full_cost)))


class VersionWatch:
    """Version counters and storage pointers of tensors, from one step boundary to the next."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int]] = {}

    @staticmethod
    def _state(t: Any) -> tuple[int, int]:
        return int(t._version), int(t.data_ptr())

    def remember(self, named: Sequence[tuple[str, Any]]) -> None:
        self._seen = {name: self._state(t) for name, t in named if t is not None}

    def changed(self, named: Sequence[tuple[str, Any]]) -> list[str]:
        """Names whose version or storage moved since :meth:`remember` (or appeared, or went)."""
        now = {name: self._state(t) for name, t in named if t is not None}
        if not self._seen:
            return []
        names = sorted(set(now) | set(self._seen))
        return [n for n in names if now.get(n) != self._seen.get(n)]
