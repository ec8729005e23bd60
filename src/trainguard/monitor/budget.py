"""Watching within an overhead budget: sampled exact checks, and version counters, at every step.

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
* every step, within the budget: the same keyed, exact sums as a full
  fingerprint, over a keyed random sample of 1 MiB chunks of the weights and
  optimizer state, taken after step t and again before step t+1.  The same
  number of chunks is read at every step, so the time a step takes says nothing
  about which chunks were read, and code without the run's key cannot predict
  them.  This catches writes that bypass the version counter (``p.data.mul_``, a
  NumPy view of the storage, native code): an edit touching ``m`` chunks with
  probability ``1 - (1 - f)**m`` at each boundary, where ``f`` is the share of
  chunks sampled; one repeated at every step within about ``1/f`` steps.

The sample size follows from the budget, the measured cost of reading a chunk
and the median step time.  During the first 16 steps, and at rank-comparison
steps, the full fingerprints of the default mode are taken instead (these steps
are known in advance; the sampled steps are not).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Any

WARMUP_STEPS = 16
CHUNK_BYTES = 1 << 20


def chunk_count(budget: float, median_step: float | None, chunk_cost: float, total: int) -> int:
    """How many chunks to sample so that reading them twice costs ``budget`` of a step."""
    if total <= 0:
        return 0
    if median_step is None or chunk_cost <= 0.0:
        return total
    return max(1, min(total, int(budget * median_step / (2.0 * chunk_cost))))


class ChunkSample:
    """A keyed choice of chunks of the watched tensors, for one step boundary."""

    def __init__(self, key: bytes) -> None:
        self.key = key[:32]

    @staticmethod
    def _layout(named: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, Any, int]], list[int]]:
        tensors, ends, total = [], [], 0
        for name, t in named:
            if t is None or not t.numel():
                continue
            per_chunk = max(1, CHUNK_BYTES // max(1, t.element_size()))
            chunks = -(-t.numel() // per_chunk)
            tensors.append((name, t, per_chunk))
            total += chunks
            ends.append(total)
        return tensors, ends

    def total(self, named: Sequence[tuple[str, Any]]) -> int:
        _, ends = self._layout(named)
        return ends[-1] if ends else 0

    def choose(
        self, named: Sequence[tuple[str, Any]], step: int, count: int
    ) -> list[tuple[str, Any]]:
        """``count`` chunks, as (tensor name, flat view), chosen from the key and ``step``."""
        tensors, ends = self._layout(named)
        if not ends:
            return []
        seed = hashlib.blake2b(step.to_bytes(8, "little", signed=True), key=self.key).digest()
        picks = random.Random(seed).sample(range(ends[-1]), min(count, ends[-1]))  # noqa: S311 - seeded from a keyed hash
        out = []
        for g in sorted(picks):
            i = bisect.bisect_right(ends, g)
            name, t, per_chunk = tensors[i]
            first = g - (ends[i - 1] if i else 0)
            flat = t.detach().reshape(-1)
            out.append((name, flat[first * per_chunk : (first + 1) * per_chunk]))
        return out


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
