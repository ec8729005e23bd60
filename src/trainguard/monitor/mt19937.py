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
