"""State a checkpoint restores that only the entry's objects hold (issue #13, red team s5
family 4): a private generator carried in ``data_state`` and the optimizer's state at the
run's start are held to recomputation, not taken on the checkpoint's word.

Generated (seed printed; TRAINGUARD_TEST_SEED replays it): the optimizer, exact or budget,
whether the entry declares ``Replayable.data_state`` or replay finds the generator itself,
and the sabotage: the augmentation generator re-seeded before ``watch()`` (V1) or between
a random step and the save after it (V1b), the optimizer's state pre-filled before the first
checkpoint for a random choice of tensors (V2); the honest twin and an honest run resumed
from another run's checkpoint must match.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.honest_runs import KEY, Combo, make_step, parts  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay  # noqa: E402
from trainguard.monitor import checkpoint as ckpt  # noqa: E402

EVERY = 2


def _combo(rnd: random.Random) -> Combo:
    return Combo(
        optimizer=rnd.choice(["sgd", "adam", "adamw"]), scheduler=rnd.random() < 0.5,
        budget=rnd.choice([None, 0.02]), every=EVERY, accumulate=1, clip=False,
        data="generator", evaluate=False, steps=6,
    )  # fmt: skip


def _augmented(c: Combo, resume: Path | None, twin: bool = False) -> tuple[Any, ...]:
    """The honest run's objects plus an augmentation generator of its own (input noise),
    as a resumed run builds them when ``resume`` names the checkpoint it goes on from;
    ``twin``: the step also holds a second generator seeded alike, which it draws from only
    when the batch's first value is impossible (replay cannot tell the two apart)."""
    model, opt, sched, loader, epoch = parts(c)
    aug = torch.Generator().manual_seed(1234)
    if resume is not None:
        saved = ckpt.read(resume)
        model.load_state_dict(saved.model)
        opt.load_state_dict(saved.optimizer)
        if sched is not None:
            sched.load_state_dict(saved.scheduler)
        aug.set_state(saved.data["state"]["aug"])
    inner = make_step(c, model, opt, sched)
    another = torch.Generator().manual_seed(1234) if twin else aug

    def step(batch: Any) -> Any:
        x, y = batch
        source = another if bool(x[0, 0] > 1e9) else aug
        return inner((x + 0.1 * torch.randn(x.shape, generator=source), y))

    return model, opt, sched, loader, epoch, step, aug


def _prefill(opt: Any, model: Any, rnd: random.Random) -> str:
    """Optimizer state for a random choice of the parameters, before watch()."""
    chosen = [p for p in model.parameters() if rnd.random() < 0.5] or [next(model.parameters())]
    for p in chosen:
        if isinstance(opt, torch.optim.SGD):
            opt.state[p] = {"momentum_buffer": torch.full_like(p, rnd.uniform(-0.5, 0.5))}
        else:
            opt.state[p] = {"step": torch.tensor(float(rnd.randint(1, 1000))),
                            "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.full_like(p, rnd.choice([0.01, 1e-6]))}  # fmt: skip
    return f"{len(chosen)} tensor(s)"


def _train(c: Combo, folder: Path, run: str, sabotage: str, at: int, rnd: random.Random,
           resume: Path | None = None) -> str:  # fmt: skip
    model, opt, sched, loader, epoch, step, aug = _augmented(c, resume)
    if sabotage == "reseed-start":
        aug.manual_seed(666)
    if sabotage == "optimizer-state":
        print("pre-filled", _prefill(opt, model, rnd))
    ledger = str(folder / "ledger.db")
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id=run, scheduler=sched, key=KEY,
        dataloader=loader, hang_seconds=None, budget=c.budget, anchors=False,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(c.steps + 1):
            if s == at and sabotage == "reseed-save":
                aug.manual_seed(667)  # after step s-1, before the save at s
            if s % c.every == 0 or s == c.steps:
                guard.checkpoint(folder / f"{run}-{s}.pt", data_state={"aug": aug.get_state()})
            if s < c.steps:
                guard.step(loss=step(next(batches)), batch=None)
    return ledger


def _entry(c: Combo, declared: bool, resume: Path | None = None, twin: bool = False) -> Any:
    def build(ctx: ReplayContext) -> Replayable:
        model, opt, sched, loader, epoch, step, aug = _augmented(c, resume, twin)
        if ctx.data_state is not None:
            aug.set_state(ctx.data_state["aug"])
        return Replayable(
            model, opt, scheduler=sched, batches=epochs_from(ctx.start, len(loader), epoch),
            step=step, dataloader=loader,
            data_state=(lambda: {"aug": aug.get_state()}) if declared else None,
        )  # fmt: skip

    return build


def _replayed(c: Combo, folder: Path, run: str, declared: bool, resume: Path | None = None,
              twin: bool = False) -> Any:  # fmt: skip
    ledger = str(folder / "ledger.db")
    return replay(ledger, run, _entry(c, declared, resume, twin), key=KEY, segmented=True,
                  checkpoint_dir=str(folder))  # fmt: skip


@pytest.mark.parametrize("sabotage", ["reseed-start", "reseed-save", "optimizer-state"])
def test_state_a_checkpoint_carries_is_held_at_its_checkpoint(
    tmp_path: Path, sabotage: str
) -> None:
    rnd = seeded()
    c = _combo(rnd)
    declared = rnd.random() < 0.5
    at = rnd.choice([2, 4, 6]) if sabotage == "reseed-save" else 0
    print(f"combo {c} declared {declared} at {at}")
    _train(c, tmp_path, "r", sabotage, at, rnd)
    report = _replayed(c, tmp_path, "r", declared)
    d = report.first_divergence
    assert report.verdict == "diverged" and report.exit_code() == 1, report.verdict
    assert d is not None and d.kind == "checkpoint" and d.step == at, (d, report.verdict)
    wanted = "optimizer state" if sabotage == "optimizer-state" else "data state aug"
    assert wanted in d.cause, d.cause
    assert any(f.rule == "TG1511" for f in report.findings())


def test_honest_runs_with_a_private_generator_and_a_resume_match(tmp_path: Path) -> None:
    rnd = seeded()
    c = _combo(rnd)
    declared = rnd.random() < 0.5
    print(f"combo {c} declared {declared}")
    first = tmp_path / "first"
    first.mkdir()
    twin = rnd.random() < 0.5
    print(f"entry with a twin generator: {twin}")
    _train(c, first, "a", "none", 0, rnd)
    report = _replayed(c, first, "a", declared, twin=twin)
    assert report.verdict == "matched" and report.exit_code() == 0, report.first_divergence
    # A second run goes on from the first's checkpoint at a random position: its entry
    # loads that checkpoint at the start (weights, optimizer state, schedule, generator).
    resume = first / f"a-{rnd.choice([2, 4])}.pt"
    second = tmp_path / "second"
    second.mkdir()
    _train(replace(c, steps=4), second, "b", "none", 0, rnd, resume)
    report = _replayed(replace(c, steps=4), second, "b", declared, resume)
    assert report.verdict == "matched" and report.exit_code() == 0, report.first_divergence
    # ... and the same entry without the resume is a fresh build: the state is named.
    report = _replayed(replace(c, steps=4), second, "b", declared)
    d = report.first_divergence
    assert report.verdict == "diverged" and d is not None and d.step == 0, report.verdict
