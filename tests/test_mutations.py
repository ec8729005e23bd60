"""Generated malicious variants: each fires under its real loader and each is flagged.

The mutation engine (``trainguard.samples.mutations``) composes targets x access
paths x call paths x encodings x containers.  Every run draws a fresh random
slice; the seed is printed and ``TRAINGUARD_MUTATION_SEED`` replays it.
``bench/mutations_bench.py`` runs thousands.  A miss found there becomes a case
in ``REGRESSIONS`` below (its whole family: the id names every axis).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.test_samples_fire import _run_all
from trainguard import Severity, scan_file
from trainguard.samples import LOADER_REQUIRES, LOADERS, missing_modules
from trainguard.samples.base import Sample
from trainguard.samples.mutation_containers import CONTAINERS, draw, parse_id
from trainguard.samples.mutation_tamper import HOOK_DICTS, HOOKS, REBUILDS, draw_tamper, hook_mutant
from trainguard.samples.mutations import ACCESS, CALLS, TARGETS, Encoding

SCAN_SLICE = 60
FIRE_SLICE = 16
# Families that once got through, replayed every run.
REGRESSIONS = [
    "mut-os.system-global-reduce-p0-none-broken-raw",
    "mut-os.system-global-reduce-p0-frame_first-clean-raw",
    "mut-pickle.loads-stack_global-reduce-p2-proto-clean-nested",
    "mut-builtins.exec-string_names-obj-p1-none-clean-gzip",
    "mut-numpy.memmap-locate-copy_reconstruct-p4-proto-garbage-joblib-xz",
    "mut-torch.save-attrgetter-rebuild_from_type-p5-frame_first-broken-legacy-torch-tar",
]


def _seed() -> int:
    text = os.environ.get("TRAINGUARD_MUTATION_SEED")
    seed = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"TRAINGUARD_MUTATION_SEED={seed}")
    return seed


@pytest.fixture(scope="module")
def seed() -> int:
    return _seed()


def _flagged(sample: Sample, folder: Path) -> tuple[bool, str]:
    path = sample.build(folder, folder / "canary")
    result = scan_file(path)
    ok = result.verdict is not None and result.verdict >= Severity.HIGH
    summary = [(f.rule, str(f.severity), f.trigger) for f in result.findings][:6]
    return ok and not (folder / "canary").exists(), f"{sample.id}: {summary} {result.error}"


def test_random_mutants_are_flagged_at_the_default_level(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    misses = []
    for i in range(SCAN_SLICE):
        sample = draw(rng)
        folder = tmp_path / str(i)
        folder.mkdir()
        ok, why = _flagged(sample, folder)
        if not ok:
            misses.append(why)
    assert not misses, f"TRAINGUARD_MUTATION_SEED={seed}: " + "\n".join(misses)


@pytest.mark.parametrize("ident", REGRESSIONS)
def test_regression_families_are_flagged(ident: str, tmp_path: Path) -> None:
    ok, why = _flagged(parse_id(ident), tmp_path)
    assert ok, why


def test_random_sleepy_mutants_are_flagged(seed: int, tmp_path: Path) -> None:
    # In-place weight edits under many names and paths: nothing runs a command.
    rng = random.Random(seed ^ 0x7A)
    misses = []
    for i in range(20):
        sample = draw_tamper(rng)
        folder = tmp_path / str(i)
        folder.mkdir()
        ok, why = _flagged(sample, folder)
        if not ok:
            misses.append(why)
    assert not misses, f"TRAINGUARD_MUTATION_SEED={seed}: " + "\n".join(misses)


def test_random_mutants_fire_under_their_real_loaders(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed ^ 0x5EED)
    samples: list[Sample] = []
    while len(samples) < FIRE_SLICE:
        sample = draw_tamper(rng) if len(samples) % 4 == 3 else draw(rng)
        if not missing_modules(sample) and sample.id not in {s.id for s in samples}:
            samples.append(sample)
    (tmp_path / "canaries").mkdir()
    outcomes = _run_all(tmp_path, samples)
    silent = [f"{sid}\n{o.log[-600:]}" for sid, o in outcomes.items() if not o.fired]
    early = [sid for sid, o in outcomes.items() if o.canary_before]
    assert not early, f"building ran the payload: {early}"
    assert not silent, f"TRAINGUARD_MUTATION_SEED={seed}: did not fire:\n" + "\n".join(silent)


def test_every_axis_value_is_reachable_and_named() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    for _ in range(2000):
        seen.update(draw(rng).id.split("-"))
    for value in (*ACCESS, *CALLS):
        assert value in seen, value
    assert all(c.loader in LOADERS and c.loader in LOADER_REQUIRES for c in CONTAINERS.values())
    sample = parse_id("mut-os.system-global-inst-p3-proto-garbage-joblib-lzma")
    assert sample.id == "mut-os.system-global-inst-p3-proto-garbage-joblib-lzma"
    assert set(TARGETS) and Encoding(3, "proto", "garbage").label() == "p3-proto-garbage"


def test_backward_hook_mutants_change_gradients_and_are_flagged(seed: int, tmp_path: Path) -> None:
    # Allowlisted rebuilds carrying backward hooks: the incident's negated gradients.
    pytest.importorskip("torch")
    rng = random.Random(seed ^ 0xB00C)
    samples = [
        hook_mutant(rng.choice(sorted(HOOKS)), rebuild, rng.choice(HOOK_DICTS))
        for rebuild in REBUILDS
    ]
    for i, sample in enumerate(samples):
        folder = tmp_path / f"scan{i}"
        folder.mkdir()
        ok, why = _flagged(sample, folder)
        assert ok, f"TRAINGUARD_MUTATION_SEED={seed}: {why}"
    (tmp_path / "canaries").mkdir()
    outcomes = _run_all(tmp_path, samples)
    assert all(o.fired for o in outcomes.values()), {k: o.log[-400:] for k, o in outcomes.items()}
