"""Carried-state checking calls a NumPy generator re-seeded only when its saved state is one
that seeding leaves and that replaying does not reach.

An honest loop draws numbers between its last step and a save (an evaluation): the saved
state is then one the replay did not end in.  Its MT19937 position lands on 624, where
seeding leaves it, once in 624 words; the position alone used to flag that as a re-seed.
"""

from __future__ import annotations

import random
import secrets
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("numpy")

import numpy as np

from trainguard.monitor import carried
from trainguard.monitor.checkpoint import random_states

FRESH = carried.MT_FRESH_POSITION


def _numpy_state(rs: Any) -> dict[str, Any]:
    """A RandomState's state as a checkpoint saves NumPy's (random_states' layout)."""
    saved = np.random.get_state()
    try:
        np.random.set_state(rs.get_state())
        return dict(random_states()["numpy"])
    finally:
        np.random.set_state(saved)


def _draw_words(rs: Any, n: int) -> None:
    if n:
        rs.randint(0, 2**32, size=n, dtype=np.uint32)  # one 32-bit word each


def test_numpy_reseed_decided_by_state_not_position() -> None:
    """Generative: seeds, steps' draws and an evaluation's draws before a save; every draw
    count that lands on position 624 included.  No honest save reads as re-seeded; a re-seed
    (integer, array or OS-entropy seed) before the save is still caught."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    landed = 0
    for _ in range(60):
        rs = np.random.RandomState(rnd.randrange(2**32))
        _draw_words(rs, rnd.randrange(0, 5000))  # the steps the replay also runs
        if rnd.random() < 0.3:
            rs.standard_normal()  # leaves a cached Gaussian sometimes
        replayed = _numpy_state(rs)
        pos = replayed["pos"]
        # The evaluation's draws: half the time exactly enough to land on 624 again.
        to_fresh = (FRESH - pos) % FRESH or FRESH
        extra = (
            to_fresh + FRESH * rnd.randrange(0, 3) if rnd.random() < 0.5 else rnd.randrange(1, 3000)
        )
        _draw_words(rs, extra)
        honest = _numpy_state(rs)
        landed += honest["pos"] == FRESH
        assert not carried.reseeded(replayed, honest), (pos, extra)
        assert not carried.reseeded(replayed, replayed)

        how = rnd.choice(["int", "array", "entropy"])
        if how == "int":
            rs.seed(rnd.randrange(2**32))
        elif how == "array":
            rs.seed([rnd.randrange(2**32) for _ in range(rnd.randrange(1, 8))])
        else:
            rs.seed(None)
        reseeded = _numpy_state(rs)
        assert carried.reseeded(replayed, reseeded), how
        # A state the replay itself ended in is honest, whatever it looks like.
        assert not carried.reseeded(reseeded, reseeded)
    assert landed > 0  # the case this test is about did occur


def test_unreadable_numpy_state_is_a_reseed() -> None:
    """Fail closed: a saved state this cannot read counts as re-seeded."""
    rs = np.random.RandomState(1)
    replayed = _numpy_state(rs)
    for broken in ({}, {"pos": FRESH}, {"pos": FRESH, "keys": [1, 2, 3]}, "x"):
        assert carried.reseeded(replayed, broken)
