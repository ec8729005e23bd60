"""Honest runs replay as matched and verify with no alert, in the combinations users run.

Generated: each CI run draws one combination (tests/honest_runs.py: optimizer,
scheduler, budget or exact, checkpoint interval, accumulation, clipping, data order,
an evaluation under fork_rng before saves; the seed printed, replayed with
``TRAINGUARD_TEST_SEED``).  bench/honest_matrix.py sweeps many.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests import honest_runs
from tests.seeds import seeded


def test_a_drawn_honest_run_replays_and_verifies_as_matched(tmp_path: Path) -> None:
    combo = honest_runs.draw(seeded())
    assert honest_runs.judge(combo, tmp_path) == []


def test_a_mid_epoch_resume_draws_what_training_drew(tmp_path: Path) -> None:
    """epochs_from from a checkpoint at any step, under each data order: the batches and
    every global draw after it are training's (a loader with no generator of its own
    draws a seed from torch's global generator on each ``iter()``: redone mid-epoch it
    moved every later draw, and an honest run diverged at its first resumed step)."""
    import torch

    from trainguard.explain.replay.engine import epochs_from
    from trainguard.monitor.checkpoint import random_states, restore_random_states

    rnd = seeded()
    combo = honest_runs.draw(rnd)
    steps = rnd.randrange(8, 20)
    at = rnd.randrange(1, steps)
    print(f"data {combo.data}, checkpoint at {at} of {steps}")

    def run(start: int, saved: dict[str, object] | None) -> list[tuple[object, ...]]:
        _, _, _, loader, epoch = honest_runs.parts(combo)
        if saved is not None:
            restore_random_states(saved)
        batches, out = epochs_from(start, len(loader), epoch), []
        for s in range(start, steps):
            if s == at and saved is None:
                state.append(random_states())
            x, _ = next(batches)
            out.append((s, x.sum().item(), torch.rand(()).item()))  # a dropout's draw
        return out

    state: list[dict[str, object]] = []
    trained = run(0, None)
    assert run(at, state[0]) == trained[at:]
