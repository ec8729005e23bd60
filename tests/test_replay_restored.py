"""What a checkpoint restores is held to a recomputation (red team A02, A06, A25).

Each value a checkpoint restores, buffers and random generators included, must equal what
replaying the segment before it ends in, or at the first checkpoint what the entry's fresh
build gives.  Generated: the sabotage (which buffer, which generator, where, how much) is
drawn from a fresh seed, printed; tiny runs of 12 steps, a checkpoint every 4.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay  # noqa: E402

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 12, 4, 48, 8  # 6 steps per epoch: checkpoints fall mid-epoch
Hook = Callable[[int, Any], None]


def parts(evaluate_at: frozenset[int] = frozenset()) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.BatchNorm1d(12),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(12, 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.8)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 6, generator=g)
    y = x[:, :1] - 2 * x[:, 1:2]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
        generator=torch.Generator(),
    )  # fmt: skip

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(500 + e)
        return loader

    done = [0]

    def step(batch: Any) -> Any:
        xb, yb = batch
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if done[0] in evaluate_at:  # what the loop does after this step: an evaluation
            evaluation()
        done[0] += 1
        return loss

    return model, opt, sched, loader, epoch, step, done


def evaluation() -> None:
    """An honest evaluation drawing from the global generators (a random eval batch)."""
    import numpy as np

    torch.randint(0, SAMPLES, (5,))
    random.random()
    np.random.rand(2)


def build(ctx: ReplayContext) -> Replayable:
    model, opt, sched, loader, epoch, step, _ = parts()
    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, scheduler=sched, batches=batches, step=step, dataloader=loader)


def build_evaluating(ctx: ReplayContext) -> Replayable:
    """The entry of a loop that evaluates after each step before a save: its step redoes
    the evaluation at the same steps, so replay recomputes the draws."""
    at = frozenset(range(EVERY - 1, STEPS, EVERY))
    model, opt, sched, loader, epoch, step, done = parts(at)
    done[0] = ctx.start
    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, scheduler=sched, batches=batches, step=step, dataloader=loader)


def build_declaring(ctx: ReplayContext) -> Replayable:
    run = build(ctx)
    run.draws_before_saves = True
    return run


def train(folder: Path, run_id: str, *, before: Hook | None = None, after: Hook | None = None,
          pre: Callable[[Any], None] | None = None) -> str:  # fmt: skip
    """``pre(model)`` before watch; ``after(s, model)`` after guard.step(s), before a save."""
    ledger = str(folder / "ledger.db")
    model, opt, sched, loader, epoch, step, _ = parts()
    if pre is not None:
        pre(model)
    guard = trainguard.watch(model, opt, ledger=ledger, run_id=run_id, scheduler=sched, key=KEY,
                             dataloader=loader, hang_seconds=None)  # fmt: skip
    guard.checkpoint(folder / f"{run_id}-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        batch = next(batches)
        loss = step(batch)
        guard.step(loss=loss, batch=batch)
        if after is not None:
            after(s, model)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-{s + 1}.pt")
    guard.close()
    return ledger


def statuses(report: Any) -> list[str]:
    return [s.status for s in report.segments]


def test_honest_batchnorm_run_matches_exactly(tmp_path: Path) -> None:
    ledger = train(tmp_path, "honest")
    report = replay(ledger, "honest", build, key=KEY, all_segments=True)
    assert set(statuses(report)) == {"matched"}, report.first_divergence
    assert not [n for s in report.segments for n in s.notes if "random" in n]


def test_a_buffer_edited_before_a_save_is_named_at_that_checkpoint(tmp_path: Path) -> None:
    """A25: BatchNorm's running statistics (or its counter) edited between a step and a save."""
    rng = seeded()
    at = rng.choice(range(EVERY, STEPS, EVERY))  # an inner checkpoint: a segment ends there
    name = rng.choice(["running_mean", "running_var", "num_batches_tracked"])
    index = rng.randrange(12)
    amount = rng.choice([-1, 1]) * rng.uniform(1e-3, 5.0)
    print(f"checkpoint {at}: 1.{name}[{index}] += {amount}")

    def edit(s: int, model: Any) -> None:
        if s == at - 1:
            with torch.no_grad():
                buf = getattr(model[1], name)
                if name == "num_batches_tracked":
                    buf.add_(1)
                else:
                    buf[index] += amount

    ledger = train(tmp_path, "buffer", after=edit)
    report = replay(ledger, "buffer", build, key=KEY, all_segments=True)
    d = report.first_divergence
    assert d is not None and d.kind == "checkpoint" and d.step == at, d
    carried = d.field("carried")
    assert carried is not None and f"model 1.{name}" in carried.tensors, carried
    # Replayed from the checkpoint at ``at`` alone (the segment before not recomputed), the
    # edit is in the ledger's digest of the buffers at save time: nothing to catch at rest.
    assert statuses(report)[: at // EVERY] == ["matched"] * (at // EVERY)


def test_the_first_checkpoint_is_held_to_the_entrys_fresh_build(tmp_path: Path) -> None:
    """A02: weights, buffers or torch's seed set before watch() and checkpoint 0."""
    rng = seeded()
    what = rng.choice(["weight", "bias", "buffer", "seed"])
    seed = rng.randrange(1, 2**31)
    print(f"before checkpoint 0: {what} ({seed})")

    def pre(model: Any) -> None:
        with torch.no_grad():
            if what == "weight":
                model[4].weight.mul_(-1.0)
            elif what == "bias":
                model[0].bias[seed % 12] += 0.5
            elif what == "buffer":
                model[1].running_var.fill_(2.0)
        if what == "seed":
            torch.manual_seed(seed)

    ledger = train(tmp_path, "first", pre=pre)
    report = replay(ledger, "first", build, key=KEY, all_segments=True)
    d = report.first_divergence
    assert d is not None and d.kind == "checkpoint" and d.step == 0, d
    named = {"weight": "model 4.weight", "bias": "model 0.bias",
             "buffer": "model 1.running_var", "seed": "rng torch"}[what]  # fmt: skip
    carried = d.field("carried")
    assert carried is not None and named in carried.tensors, carried
    assert "entry point builds" in d.cause


def test_generators_moved_before_a_save_are_not_matched(tmp_path: Path) -> None:
    """A06: a generator moved on between a step and a save (no re-seed shows) is never a
    match: the draws are not redone, and the moved state picks every later random number.
    Not comparable (exit 2), not sabotage: an honest evaluation looks the same."""
    import numpy as np

    rng = seeded()
    at = rng.choice(range(EVERY, STEPS, EVERY))
    which = rng.choice(["torch", "python", "numpy"])
    draws = rng.randrange(1, 20_000)
    print(f"before checkpoint {at}: {draws} draws from {which}")

    def draw(s: int, model: Any) -> None:
        if s == at - 1:
            {"torch": lambda: torch.rand(draws), "python": lambda: [random.random()
             for _ in range(draws)], "numpy": lambda: np.random.rand(draws)}[which]()  # fmt: skip

    ledger = train(tmp_path, "moved", after=draw)
    report = replay(ledger, "moved", build, key=KEY, all_segments=True)
    seg = next(s for s in report.segments if s.start == at)
    assert seg.status == "not-comparable", statuses(report)
    assert seg.divergence is not None and f"rng {which}" in seg.divergence.field("carried").tensors
    assert report.verdict != "matched"
    assert any("drew random numbers" in n for n in seg.notes), seg.notes
    assert "draws_before_saves" in seg.divergence.cause


def test_a_reseed_before_a_save_is_a_divergence(tmp_path: Path) -> None:
    rng = seeded()
    at = rng.choice(range(EVERY, STEPS, EVERY))
    seed = rng.randrange(2**31)
    print(f"before checkpoint {at}: torch.manual_seed({seed})")

    def reseed(s: int, model: Any) -> None:
        if s == at - 1:
            torch.manual_seed(seed)

    ledger = train(tmp_path, "reseed", after=reseed)
    report = replay(ledger, "reseed", build, key=KEY, all_segments=True)
    seg = next(s for s in report.segments if s.start == at)
    assert seg.status == "diverged", statuses(report)


def test_evaluations_before_saves_match_when_recomputed_or_kept_apart(tmp_path: Path) -> None:
    """Honest loops that evaluate between the last step and a save stay silent: the entry's
    step redoes the evaluation (replay recomputes the draws), or the evaluation draws under
    torch.random.fork_rng (the training generators are left as the step left them)."""

    def evaluate(s: int, model: Any) -> None:
        if (s + 1) % EVERY == 0:
            evaluation()

    ledger = train(tmp_path, "evaluated", after=evaluate)
    report = replay(ledger, "evaluated", build_evaluating, key=KEY, all_segments=True)
    assert set(statuses(report)) == {"matched"}, report.first_divergence
    # Not redone, the verifier's entry may declare them: noted, the steps after replay
    # from the checkpoint's states (the allowance is then open, and said so).
    report = replay(ledger, "evaluated", build_declaring, key=KEY, all_segments=True)
    assert set(statuses(report)) == {"matched"}, report.first_divergence
    assert any("draws_before_saves" in n for s in report.segments for n in s.notes)

    def forked(s: int, model: Any) -> None:
        if (s + 1) % EVERY == 0:
            with torch.random.fork_rng():
                torch.randint(0, SAMPLES, (5,))

    (tmp_path / "f").mkdir()
    ledger = train(tmp_path / "f", "forked", after=forked)
    report = replay(ledger, "forked", build, key=KEY, all_segments=True)
    assert set(statuses(report)) == {"matched"}, report.first_divergence


# -- the data position a checkpoint restores (A16, A28) --------------------------------------


def build_skipping(ctx: ReplayContext) -> Replayable:
    """An entry that takes a data position from data_state (docs/replay.md allows it)."""
    model, opt, sched, loader, epoch, step, _ = parts()
    skip = int((ctx.data_state or {}).get("skip", 0))
    batches = epochs_from(ctx.start + skip, len(loader), epoch)
    return Replayable(model, opt, scheduler=sched, batches=batches, step=step, dataloader=loader)


def train_skipping(folder: Path, run_id: str, at: int | None, skip: int) -> str:
    """Checkpoints record data_state {"skip": n}; from ``at`` on training skips ``skip``
    batches and says so in data_state (a position the recomputation never reaches)."""
    ledger = str(folder / "ledger.db")
    model, opt, sched, loader, epoch, step, _ = parts()
    guard = trainguard.watch(model, opt, ledger=ledger, run_id=run_id, scheduler=sched, key=KEY,
                             dataloader=loader, hang_seconds=None)  # fmt: skip
    moved = 0
    guard.checkpoint(folder / f"{run_id}-0.pt", data_state={"skip": moved})
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        batch = next(batches)
        guard.step(loss=step(batch), batch=batch)
        if at is not None and s + 1 == at:
            moved = skip
            batches = epochs_from(s + 1 + skip, len(loader), epoch)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-{s + 1}.pt", data_state={"skip": moved})
    guard.close()
    return ledger


def test_a_data_position_moved_in_data_state_is_named_at_its_checkpoint(tmp_path: Path) -> None:
    """A16: data_state the entry honours is held to where the segment before's data goes
    on: the first batch from the checkpoint must be the one replaying up to it reads next."""
    rng = seeded()
    at = rng.choice(range(EVERY, STEPS, EVERY))
    skip = rng.randrange(1, 6)  # fewer than an epoch: another batch, never the same one
    print(f"checkpoint {at}: {skip} batches skipped")
    ledger = train_skipping(tmp_path, "skip", at, skip)
    report = replay(ledger, "skip", build_skipping, key=KEY, all_segments=True)
    seg = next(s for s in report.segments if s.start == at)
    assert seg.status == "diverged", statuses(report)
    assert seg.divergence is not None and seg.divergence.kind == "checkpoint"
    assert seg.divergence.field("carried").tensors == ("data position",)
    (tmp_path / "h").mkdir()
    ledger = train_skipping(tmp_path / "h", "noskip", None, 0)
    report = replay(ledger, "noskip", build_skipping, key=KEY, all_segments=True)
    assert set(statuses(report)) == {"matched"}, report.first_divergence


def parts_once() -> tuple[Any, ...]:
    """A loader whose generator is seeded once, at build (not per epoch)."""
    model, opt, sched, loader, _, step, done = parts()
    loader.generator.manual_seed(1000)
    return model, opt, sched, loader, (lambda e: loader), step, done


def build_once(ctx: ReplayContext) -> Replayable:
    model, opt, sched, loader, epoch, step, _ = parts_once()
    if ctx.loader_state and "generator" in ctx.loader_state:
        loader.generator.set_state(ctx.loader_state["generator"])
    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, scheduler=sched, batches=batches, step=step, dataloader=loader)


def test_a_loader_seeded_once_is_outside_the_data_contract_not_sabotage(tmp_path: Path) -> None:
    """A28: torch's RandomSampler draws its last permutation when an epoch's iterator is
    exhausted, after a save at the epoch's end: an entry cannot resume such a loader there.
    Honest: not comparable (the segment before reaches the batch training read).  The
    loader's generator moved before that save (an order chosen): a divergence."""
    rng = seeded()
    draws = rng.randrange(1, 64)
    print(f"sabotage: {draws} draws from the loader's generator")
    for run_id, moved in (("once", False), ("chosen", True)):
        folder = tmp_path / run_id
        folder.mkdir()
        model, opt, sched, loader, epoch, step, _ = parts_once()
        guard = trainguard.watch(model, opt, ledger=str(folder / "l.db"), run_id=run_id,
                                 scheduler=sched, key=KEY, dataloader=loader,
                                 hang_seconds=None)  # fmt: skip
        guard.checkpoint(folder / "0.pt")
        batches = epochs_from(0, len(loader), epoch)
        per_epoch = len(loader)
        for s in range(2 * per_epoch):
            batch = next(batches)
            guard.step(loss=step(batch), batch=batch)
            if s + 1 == per_epoch:
                if moved:
                    torch.randint(0, 2**31, (draws,), generator=loader.generator)
                guard.checkpoint(folder / f"{s + 1}.pt")
        guard.close()
        report = replay(str(folder / "l.db"), run_id, build_once, key=KEY, all_segments=True)
        seg = next(s for s in report.segments if s.start == per_epoch)
        assert seg.divergence is not None and seg.divergence.kind == "checkpoint", statuses(report)
        assert seg.status == ("diverged" if moved else "not-comparable"), seg.divergence
        assert moved or "outside the data contract" in seg.divergence.cause
