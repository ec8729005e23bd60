"""How many draws lead from one state of torch's CPU generator to another, if any.

torch's CPU generator is a Mersenne Twister (mt19937): 624 32-bit words,
twisted as a whole every 624 draws, and a position in the current block.
``Generator.get_state()`` gives them as a fixed C struct (``CPUGeneratorImplState``
in ATen: the initial seed, ``left``, ``seeded``, ``next``, the 624 words as
64-bit integers, then cached normal samples: 5056 bytes).  A generator only
moves forward, so the state at a later time must be the earlier one advanced
by some number of draws ``k``.  ``advance`` finds ``k`` or says there is none
within a bound:

* the same words: ``k`` is the change in position (it never goes backwards);
* other words: they must be the earlier words twisted ``j`` times.  The twist
  is a recurrence; rather than simulating it, a clone of the earlier state
  draws the blocks in between with torch itself (``random_()`` on int32: one
  32-bit draw per element, its tempered value modulo 2**31), and the block
  whose outputs equal the tempering of the later words is block ``j``.  Tempering
  is a bijection, so equal outputs for a whole block (624 values, 31 bits each)
  mean equal words.  The cost is that of drawing ``k`` numbers: what the step
  itself drew.

A state set from elsewhere (``set_state`` with a foreign state, whose
initial-seed field was copied from the real one) is reachable by no ``k``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

N = 624
STATE_BYTES = 5056  # sizeof(CPUGeneratorImplState) on the builds this layout was read from
_HEADER = struct.Struct("<QiiQ")  # the_initial_seed, left, seeded, next
_WORDS = _HEADER.size
CHUNK_BLOCKS = 256  # at most this many blocks drawn per call while searching


@dataclass(frozen=True)
class MtState:
    seed: int
    left: int  # draws until the next twist, plus one (624 + 1 - position)
    next: int  # the position in the current block (0 right after seeding)
    raw: bytes  # the whole state

    @property
    def remaining(self) -> int:
        """Draws left in the current block before the next twist."""
        return self.left - 1

    @property
    def word_bytes(self) -> bytes:
        return self.raw[_WORDS : _WORDS + 8 * N]

    def words(self) -> Any:
        import torch

        return torch.frombuffer(bytearray(self.word_bytes), dtype=torch.int64)


def parse(state: Any) -> MtState | None:
    """The generator's seed, position and words; None when the layout is not the one known."""
    import torch

    if state.numel() != STATE_BYTES or state.dtype != torch.uint8:
        return None
    raw = state.numpy().tobytes()
    seed, left, _seeded, nxt = _HEADER.unpack_from(raw, 0)
    if not 1 <= left <= N or (left + nxt != N + 1 and (left, nxt) != (1, 0)):
        return None
    return MtState(seed, left, nxt, raw)


def temper(words: Any) -> Any:
    """mt19937's output function, on a tensor of 32-bit words held in int64."""
    y = words & 0xFFFFFFFF
    y = y ^ (y >> 11)
    y = y ^ ((y << 7) & 0x9D2C5680)
    y = y ^ ((y << 15) & 0xEFC60000)
    y = y ^ (y >> 18)
    return y & 0xFFFFFFFF


def advance(before: Any, after: Any, max_draws: int) -> int | None:
    """Draws from state ``before`` to state ``after`` (raw ``get_state()`` tensors),
    or None if ``after`` is not reachable within ``max_draws`` draws."""
    import torch

    a, b = parse(before), parse(after)
    if a is None or b is None or a.seed != b.seed:
        return None
    if a.word_bytes == b.word_bytes:
        k = a.left - b.left
        return k if 0 <= k <= max_draws else None
    # Draws after the first twist: the rest of a's block, whole blocks, b's position.
    if (b.left, b.next) == (1, 0):
        return None  # a freshly seeded state is reached by seeding, never by drawing
    into_b = N + 1 - b.left
    target = (temper(b.words()) % (1 << 31)).to(torch.int32)
    g = torch.Generator()
    g.set_state(before)
    if a.remaining:
        torch.empty(a.remaining, dtype=torch.int32).random_(generator=g)
    budget_blocks = (max_draws - a.remaining - into_b) // N + 1
    done, chunk = 0, 1
    while done < budget_blocks:
        # Doubling chunks: a step that drew little costs little, a long search few calls.
        blocks, chunk = min(chunk, CHUNK_BLOCKS, budget_blocks - done), chunk * 2
        rows = torch.empty(blocks * N, dtype=torch.int32).random_(generator=g).view(blocks, N)
        hits = (rows[:, 0] == target[0]).nonzero().flatten().tolist()
        for i in hits:
            if torch.equal(rows[i], target):
                return a.remaining + N * (done + int(i)) + into_b
        done += blocks
    return None


def fresh(seed: int) -> Any:
    """The state of a generator just seeded with ``seed``."""
    import torch

    return torch.Generator().manual_seed(seed).get_state()


# -- Python's ``random`` and NumPy's legacy global generator: the same Mersenne Twister ----
def words_advance(
    before: tuple[Any, int], after: tuple[Any, int], stream: Any, max_draws: int
) -> int | None:
    """Draws from ``before`` to ``after``, each ``(624 words, index)`` where ``index`` is the
    number of words of the current block already used (624 right after seeding), as
    CPython and NumPy keep it; ``stream(n)`` draws the next ``n`` raw outputs from a
    clone of ``before`` (a NumPy uint32 array).  None when not reachable in ``max_draws``."""
    import numpy as np

    (w0, i0), (w1, i1) = before, after
    w0, w1 = np.asarray(w0, dtype=np.uint32), np.asarray(w1, dtype=np.uint32)
    if w0.shape != (N,) or w1.shape != (N,) or not (0 <= i0 <= N and 0 <= i1 <= N):
        return None
    if np.array_equal(w0, w1):
        k = i1 - i0
        return k if 0 <= k <= max_draws else None
    y = w1.astype(np.uint64)
    y ^= y >> np.uint64(11)
    y ^= (y << np.uint64(7)) & np.uint64(0x9D2C5680)
    y ^= (y << np.uint64(15)) & np.uint64(0xEFC60000)
    y ^= y >> np.uint64(18)
    target = (y & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    remaining = N - i0
    if remaining:
        stream(remaining)
    budget_blocks = (max_draws - remaining - i1) // N + 1
    done, chunk = 0, 1
    while done < budget_blocks:
        blocks, chunk = min(chunk, CHUNK_BLOCKS, budget_blocks - done), chunk * 2
        rows = np.asarray(stream(blocks * N), dtype=np.uint32).reshape(blocks, N)
        for i in np.flatnonzero(rows[:, 0] == target[0]).tolist():
            if np.array_equal(rows[i], target):
                return remaining + N * (done + int(i)) + i1
        done += blocks
    return None


def python_advance(before: Any, after: Any, max_draws: int) -> int | None:
    """``random.getstate()`` to ``random.getstate()``: draws between, or None."""
    import random

    import numpy as np

    if before[0] != 3 or after[0] != 3 or len(before[1]) != N + 1 or len(after[1]) != N + 1:
        return None
    clone = random.Random()  # noqa: S311 (a clone of the generator under check: no secret)
    clone.setstate(before)

    def stream(n: int) -> Any:
        raw = clone.getrandbits(32 * n).to_bytes(4 * n, "little")
        return np.frombuffer(raw, dtype="<u4")

    return words_advance(
        (before[1][:N], before[1][N]), (after[1][:N], after[1][N]), stream, max_draws
    )


def numpy_advance(before: Any, after: Any, max_draws: int) -> int | None:
    """``numpy.random.get_state()`` to ``numpy.random.get_state()``: draws between, or None."""
    import numpy as np

    if before[0] != "MT19937" or after[0] != "MT19937":
        return None
    clone = np.random.MT19937()
    clone.state = {"bit_generator": "MT19937", "state": {"key": before[1], "pos": before[2]}}

    def stream(n: int) -> Any:
        return clone.random_raw(n).astype(np.uint32)

    return words_advance((before[1], before[2]), (after[1], after[2]), stream, max_draws)
