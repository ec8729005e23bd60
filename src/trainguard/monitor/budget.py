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

Every other check whose cost grows with the model or the watched surface (the
update and state models, the direction probe, code identity, the surface sweep,
random-state digests, the chunk sample itself, the guard's self-check and the
parameter identity check) is a *unit* of a
:class:`Schedule`: at each step a unit runs with a probability drawn from the
run's key, and the probabilities follow each unit's measured cost so that the
expected guard time stays within the budget (never below ``1 / SPARSEST``).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

WARMUP_STEPS = 16
CHUNK_BYTES = 1 << 20
# Aim at this share of the budget: the guard's fixed costs vary from step to step.
MARGIN = 0.85
# A scheduled unit runs on at least one step in this many on average, whatever the
# budget: a budget smaller than the guard's fixed costs still checks now and then.
SPARSEST = 64
# Weight of the newest measurement in a unit's running cost.
SMOOTHING = 0.2
RECENT = 1024  # steps remembered per unit
RESHARE = 16  # steps without a unit run between two sharings of the allowance
DRAWS_PER_HASH = 16  # units drawn from one 64-byte keyed hash (4 bytes each: p >= 1/64)


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
    """Version counters and storage pointers of tensors, from one step boundary to the next.

    Tensors are named by any sortable key (the tamper check uses tuples that are cheap
    to build and turns only the changed ones into names)."""

    def __init__(self) -> None:
        # Names and states in the order remembered: the common case (nothing moved) is
        # two list comparisons, without building a dict at every step.
        self._names: list[Any] = []
        self._states: list[tuple[int, int, int]] = []

    @staticmethod
    def _state(t: Any) -> tuple[int, int, int]:
        return t._version, t.data_ptr(), id(t)

    def remember(self, named: Sequence[tuple[Any, Any]]) -> None:
        self._names = [name for name, t in named if t is not None]
        self._states = [(t._version, t.data_ptr(), id(t)) for _, t in named if t is not None]

    def forget(self) -> None:
        """Nothing remembered: :meth:`changed` finds nothing until the next remember."""
        self._names, self._states = [], []

    def changed(self, named: Sequence[tuple[Any, Any]]) -> list[Any]:
        """Names whose version or storage moved since :meth:`remember` (or appeared, or went)."""
        if not self._names:
            return []
        names = [name for name, t in named if t is not None]
        states = [(t._version, t.data_ptr(), id(t)) for _, t in named if t is not None]
        if names == self._names and states == self._states:
            return []
        now = dict(zip(names, states, strict=True))
        seen = dict(zip(self._names, self._states, strict=True))
        if now == seen:
            return []
        every = sorted(set(now) | set(seen))
        return [n for n in every if now.get(n) != seen.get(n)]


def step_draws(key: bytes, units: Sequence[str], step: int) -> dict[str, float]:
    """Keyed uniform numbers in [0, 1) for each of ``units`` at ``step``: one keyed hash
    per step for up to ``DRAWS_PER_HASH`` units (four bytes each), not one per unit (a
    hash per unit and step was a fixed cost of every step in budget mode)."""
    out: dict[str, float] = {}
    for block in range(0, len(units), DRAWS_PER_HASH):
        salt = f"draws|{block}|{step}".encode()
        digest = hashlib.blake2b(salt, key=key[:32], digest_size=64).digest()
        for i, unit in enumerate(units[block : block + DRAWS_PER_HASH]):
            out[unit] = int.from_bytes(digest[4 * i : 4 * i + 4], "little") / 2.0**32
    return out


def keyed_draw(key: bytes, unit: str, step: int) -> float:
    """A keyed uniform number in [0, 1) for ``unit`` at ``step`` (the schedule's draw; the
    guard's self-check draws its floor with it from its own copy of the key)."""
    h = hashlib.blake2b(f"{unit}|{step}".encode(), key=key[:32], digest_size=8)
    return int.from_bytes(h.digest(), "little") / 2.0**64


def chances(allowance: float, costs: dict[str, float]) -> tuple[dict[str, float], float]:
    """The probability of running each unit at a step, and the seconds each may spend.

    The allowance (seconds per step) is shared equally; a unit cheaper than its share
    always runs and leaves the rest to the others (water-filling).  A unit not yet
    measured (cost 0) always runs, so it gets measured.  Returns the probabilities and
    the share each unit that does not always run gets (a unit whose size can grow, the
    chunk sample, grows to it).
    """
    out: dict[str, float] = {}
    left, room = dict(costs), max(0.0, allowance)
    while left:
        share = room / len(left)
        cheap = [u for u, c in left.items() if c <= share]
        if not cheap:
            for u, c in left.items():
                out[u] = max(1.0 / SPARSEST, share / c)
            return out, share
        for u in cheap:
            out[u] = 1.0
            room -= left.pop(u)
    return out, room


class Schedule:
    """Budget mode: which units run at each step, drawn with the run's key.

    A draw is a keyed hash of the unit and the step, so code without the key cannot
    tell in advance which steps a unit checks.  ``update`` folds in what the last step
    cost (the guard's whole time, and each unit's) and sets the next probabilities.
    """

    def __init__(self, key: bytes, budget: float, units: Sequence[str]) -> None:
        self.key = key[:32]
        self.budget = budget
        self.cost = dict.fromkeys(units, 0.0)  # seconds per run, smoothed
        self.chance = dict.fromkeys(units, 1.0)
        self.share = 0.0  # seconds per step a growing unit (the chunk sample) may use
        self.fixed: float | None = None  # the guard's seconds per step outside the units
        self._spent = dict.fromkeys(units, 0.0)  # this step's seconds per unit
        self.runs_at: dict[str, int] = dict.fromkeys(units, 0)  # steps each unit ran at
        # The draws of the last steps asked for: the guard asks for step t+1 at step t's
        # pre-hook (to arm the units that start before t+1's hooks), then again at t+1.
        self._drawn: dict[int, frozenset[str]] = {}
        # The last steps each unit ran at (tests, and what a report may quote).
        self.recent: dict[str, deque[int]] = {u: deque(maxlen=RECENT) for u in units}
        self._units = sorted(self.chance)  # the order of the units' bytes in a step's draw
        self._draw_cache: dict[int, dict[str, float]] = {}
        self._unshared = RESHARE  # steps since the allowance was last shared out

    def draw(self, unit: str, step: int) -> float:
        """A keyed uniform number in [0, 1) for ``unit`` at ``step``."""
        return self._draws(step)[unit]

    def _draws(self, step: int) -> dict[str, float]:
        """Every unit's draw at ``step`` (the last few steps' kept: the guard and a
        further optimizer's lane ask for the same steps)."""
        found = self._draw_cache.get(step)
        if found is None:
            if len(self._draw_cache) > 4:
                self._draw_cache.clear()
            found = self._draw_cache[step] = step_draws(self.key, self._units, step)
        return found

    def runs(self, step: int) -> frozenset[str]:
        """The units that run at ``step`` (all of them during the warm-up); asked again
        for the same step (an optimizer whose step hooks run twice, or the guard arming
        the next step's backward hooks), the same answer."""
        known = self._drawn.get(step)
        if known is not None:
            return known
        if step < WARMUP_STEPS or self.budget >= 1.0:
            found = frozenset(self.chance)
        else:
            draws = self._draws(step)
            found = frozenset(u for u, p in self.chance.items() if draws[u] < p)
        for u in found:
            self.runs_at[u] += 1
            self.recent[u].append(step)
        self._drawn = {s: f for s, f in self._drawn.items() if s >= step - 1}
        self._drawn[step] = found
        return found

    def charge(self, unit: str, seconds: float, *, run: float | None = None) -> None:
        """``unit`` spent ``seconds`` in this step; ``run``: what one whole run of it
        cost, when a run spans two steps (the chunk sample: read after step t, read
        again before t+1); otherwise a run is what the unit spent in the step."""
        self._spent[unit] += seconds
        if run is not None:
            self._fold(unit, run)

    def _fold(self, unit: str, seconds: float) -> None:
        old = self.cost[unit]
        self.cost[unit] = seconds if not old else (1 - SMOOTHING) * old + SMOOTHING * seconds

    def update(self, spent: float, median_step: float | None, *, spans: Sequence[str] = ()) -> None:
        """The guard spent ``spent`` seconds on the step just finished; ``spans``: the
        units whose runs span two steps (their costs come through ``charge(run=)``)."""
        ran = {u: s for u, s in self._spent.items() if s > 0.0}
        self._spent = dict.fromkeys(self._spent, 0.0)
        for u, s in ran.items():
            if u not in spans:
                self._fold(u, s)
        fixed = max(0.0, spent - sum(ran.values()))
        if not self.fixed:  # the first measurement (or only zeros so far)
            self.fixed = fixed
        else:
            # Outliers (a GC pause, a ledger fsync) should not starve the units for long.
            self.fixed = (1 - SMOOTHING) * self.fixed + SMOOTHING * min(fixed, 3 * self.fixed)
        if median_step is None or self.budget >= 1.0:
            return
        # Shared out again when a unit's cost moved (one ran) and every RESHARE steps
        # (the fixed cost and the median drift slowly): not at every step.
        self._unshared += 1
        if not ran and self._unshared < RESHARE:
            return
        self._unshared = 0
        allowance = MARGIN * self.budget * median_step - self.fixed
        self.chance, self.share = chances(allowance, self.cost)

    def allowance(self, unit: str) -> float:
        """Seconds per run a unit of growing size (the chunk sample) may take next."""
        if all(p >= 1.0 for p in self.chance.values()):
            return self.cost[unit] + self.share  # everything runs: the room left over
        return self.share
