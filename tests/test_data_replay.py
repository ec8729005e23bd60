"""Sealed data through replay and the verifier: a relabelled, poisoned, swapped,
duplicated or replaced sample, or a re-seeded sampler, is named with its step, sample
index, shard and rank, at the very step it happened; an honest run matches."""

from __future__ import annotations

import random
import secrets
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests import data_train as dt
from trainguard.explain.replay.engine import replay

RULES = {"relabel": "TG1520", "poison": "TG1520", "replace": "TG1520"}
RULES.update(swap="TG1521", duplicate="TG1521", reseed="TG1521")


def _run(tmp_path: Path, sabotage: str, seed: int) -> tuple[object, int, list[int], object]:
    rnd = random.Random(seed)
    data, public, total = dt.make_dataset(tmp_path, rnd)
    per_epoch = dt.steps_per_epoch(total)
    steps = 3 * per_epoch
    at = rnd.randrange(1, 2 * per_epoch)
    if sabotage == "reseed":
        at = -(-at // per_epoch) * per_epoch  # the first step of the re-seeded epoch
    chosen = dt.train(tmp_path, data, public, steps, sabotage, at, rnd)
    report = replay(str(tmp_path / "ledger.db"), "run", dt.build_for(data, public), key=dt.KEY)
    return report, at, chosen, (data, public)


def test_each_sabotage_is_named_at_its_step(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    sabotage = random.Random(seed).choice(dt.SABOTAGES)
    print(f"seed {seed}: {sabotage}")
    report, at, chosen, _ = _run(tmp_path, sabotage, seed)
    d = report.first_divergence  # type: ignore[attr-defined]
    assert d is not None and d.step == at, (seed, sabotage, at, d)
    rules = [f.rule for f in report.findings()]  # type: ignore[attr-defined]
    assert rules and rules[0] == RULES[sabotage], (seed, rules, d.cause)
    message = report.findings()[0].message  # type: ignore[attr-defined]
    assert "rank 0" in message and "shard part-" in message, (seed, message)
    if sabotage != "reseed":
        # The position the sabotage touched is named with the sample the seed put there.
        assert any(f"sample {i} " in message for i in chosen), (seed, chosen, message)


def test_honest_run_over_sealed_data_matches(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    report, _, _, _ = _run(tmp_path, "none", seed)
    assert report.verdict == "matched", report.first_divergence  # type: ignore[attr-defined]
    assert report.findings() == []  # type: ignore[attr-defined]
