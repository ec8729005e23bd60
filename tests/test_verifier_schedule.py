"""State a checkpoint carries, changed in the training process and saved consistently,
is named at that checkpoint whether or not the verifier drew the segment before it.

Issue #13: with the segment before undrawn, a raised ``gamma``, changed ``base_lrs``,
``weight_decay``, ``betas``, ``eps`` or ``momentum``, a lambda's state or a moved
``last_epoch`` was held only to the ledger's digests of the save, which the process writes
with the file: it replayed clean from the checkpoint on (the training went on with it).
Now the entry's own scheduler and param groups, stepped to the checkpoint's count, are the
witness (explain/replay/schedwitness.py).

Generated (seed printed; ``TRAINGUARD_TEST_SEED`` replays): the optimizer and scheduler,
which value, which checkpoint, whether the segment before it is drawn; honest runs, exact
and on a budget, with the same draws must match.  Runs are 15 steps, a checkpoint every 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

import trainguard
from tests.seeds import seeded
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from
from trainguard.explain.verifier.follow import Verifier
from trainguard.explain.verifier.sampling import secret_from
from trainguard.signing.keys import write_keypair

KEY = bytes(range(32))
STEPS, EVERY, SAMPLES, BATCH = 15, 5, 48, 8
NEVER = 1e-12  # no segment drawn by the secret: the test picks the segment itself


class Warmup:
    """A lambda with state of its own (LambdaLR saves a callable object's __dict__)."""

    def __init__(self, warm: int) -> None:
        self.warm = warm

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warm) * 0.97**epoch


def parts(optimizer: str, schedule: str) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if optimizer == "sgd":
        opt: Any = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    makers: dict[str, Any] = {
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
        "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, Warmup(4)),
        "none": lambda: None,
    }
    sched = makers[schedule]()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :1] * 3 - x[:, 2:3])
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator()
    )

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(1000 + e)
        return loader

    return model, opt, sched, loader, epoch


def make_step(model: Any, opt: Any, sched: Any) -> Any:
    def step(batch: Any) -> Any:
        xb, yb = batch
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if sched is not None:
            sched.step()
        return loss.detach()

    return step


def entry(optimizer: str, schedule: str) -> Any:
    def build(ctx: ReplayContext) -> Replayable:
        model, opt, sched, loader, epoch = parts(optimizer, schedule)
        return Replayable(
            model, opt, scheduler=sched, batches=epochs_from(ctx.start, len(loader), epoch),
            step=make_step(model, opt, sched), dataloader=loader,
        )  # fmt: skip

    return build


def _scale(group: dict[str, Any], key: str, factor: float) -> None:
    value = group[key]
    group[key] = tuple(v * factor for v in value) if isinstance(value, tuple) else value * factor


def _move(sched: Any, by: int) -> None:
    sched.last_epoch += by
    sched._step_count += by


# What a process changes right before a save, and keeps training with.  Each: which runs
# it applies to, the edit, and the name the checkpoint's difference must carry.
EDITS: dict[str, tuple[Any, Any, str]] = {
    "gamma": (lambda o, s: s == "step", lambda opt, sch: setattr(sch, "gamma", 0.9),
              "scheduler gamma"),
    "step_size": (lambda o, s: s == "step", lambda opt, sch: setattr(sch, "step_size", 6),
                  "scheduler step_size"),
    "T_max": (lambda o, s: s == "cosine", lambda opt, sch: setattr(sch, "T_max", 60),
              "scheduler T_max"),
    "base_lrs": (lambda o, s: s != "none",
                 lambda opt, sch: setattr(sch, "base_lrs", [b * 1.5 for b in sch.base_lrs]),
                 "scheduler base_lrs"),
    "lambda-state": (lambda o, s: s == "lambda",
                     lambda opt, sch: setattr(sch.lr_lambdas[0], "warm", 1),
                     "scheduler lr_lambdas"),
    # Moved by 6 counts: across a StepLR decay (step_size 3), on along a cosine or warm-up.
    "last_epoch": (lambda o, s: s != "none",
                   lambda opt, sch: setattr(sch, "last_epoch", sch.last_epoch + 6), ""),
    # A careful process moves the step count too: then only the rate the schedule gives
    # at the moved count (not the checkpoint's) tells.
    "last_epoch-and-count": (lambda o, s: s != "none", lambda opt, sch: _move(sch, 6), ""),
    "weight_decay": (lambda o, s: True,
                     lambda opt, sch: _scale(opt.param_groups[0], "weight_decay", 10.0),
                     "optimizer group 0 weight_decay"),
    "betas": (lambda o, s: o == "adamw",
              lambda opt, sch: _scale(opt.param_groups[0], "betas", 0.99),
              "optimizer group 0 betas"),
    "eps": (lambda o, s: o == "adamw", lambda opt, sch: _scale(opt.param_groups[0], "eps", 100.0),
            "optimizer group 0 eps"),
    "momentum": (lambda o, s: o == "sgd",
                 lambda opt, sch: _scale(opt.param_groups[0], "momentum", 0.5),
                 "optimizer group 0 momentum"),
}  # fmt: skip


def _train(folder: Path, optimizer: str, schedule: str, edit: str | None, at: int,
           budget: float | None) -> None:  # fmt: skip
    model, opt, sched, loader, epoch = parts(optimizer, schedule)
    step = make_step(model, opt, sched)
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id="r", scheduler=sched, key=KEY,
        dataloader=loader, hang_seconds=None, on_alert=lambda alert: None, budget=budget,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(STEPS + 1):
            if s == at and edit is not None:
                EDITS[edit][1](opt, sched)  # after the last step's record, before the save
            if s % EVERY == 0:
                guard.checkpoint(folder / f"r-{s}.pt")
            if s < STEPS:
                guard.step(loss=step(next(batches)), batch=None)


def _verify(folder: Path, build: Any, a: int, b: int) -> Any:
    private = folder / "verifier.pem"
    if not private.exists():  # one verifier key per folder
        private, _ = write_keypair(folder / "verifier")
    verifier = Verifier(
        str(folder / "ledger.db"), "r", build, signing_key=str(private),
        secret=secret_from(private.read_bytes()), rate=NEVER, run_key=KEY,
        checkpoint_dir=str(folder),
    )  # fmt: skip
    try:
        verifier.poll()  # reads the run; nothing drawn at this rate
        return verifier._verify(a, b, 1)
    finally:
        verifier.close()


def _draw(rnd: Any) -> tuple[str, str, str, int, bool]:
    while True:
        optimizer = rnd.choice(["sgd", "adamw"])
        schedule = rnd.choice(["step", "cosine", "lambda", "none"])
        edit = rnd.choice(sorted(EDITS))
        if EDITS[edit][0](optimizer, schedule):
            return optimizer, schedule, edit, rnd.choice([5, 10]), rnd.random() < 0.5


def test_checkpoint_state_changed_before_a_save_is_named_there(tmp_path: Path) -> None:
    rnd = seeded()
    optimizer, schedule, edit, at, drawn = _draw(rnd)
    print(f"{optimizer}, {schedule}: {edit} changed before the save at {at}; "
          f"segment before drawn: {drawn}")  # fmt: skip
    _train(tmp_path, optimizer, schedule, edit, at, None)
    a, b = (at - EVERY, at) if drawn else (at, at + EVERY)
    verdict = _verify(tmp_path, entry(optimizer, schedule), a, b)
    assert verdict.status == "diverged" and verdict.step == at, verdict
    named = EDITS[edit][2]
    if named:  # a moved count shows as the rate it gives, or the count itself
        assert named in verdict.cause, verdict.cause
    assert "TG1510" not in str(verdict.fields)


@pytest.mark.parametrize("budget", [None, 0.02])
def test_honest_runs_match_from_a_checkpoint_whose_segment_before_is_undrawn(
    tmp_path: Path, budget: float | None
) -> None:
    rnd = seeded()
    optimizer, schedule, _, at, _ = _draw(rnd)
    print(f"{optimizer}, {schedule}, budget {budget}: the segment from {at} alone")
    _train(tmp_path, optimizer, schedule, None, at, budget)
    verdict = _verify(tmp_path, entry(optimizer, schedule), at, at + EVERY)
    assert verdict.status == "matched", verdict


def test_a_schedule_changed_on_purpose_is_recorded_and_not_named(tmp_path: Path) -> None:
    """guard.step(changed=["scheduler"]) and hyper= are data in the step record (``changed``,
    ``hyper_changed``); a checkpoint after a declared schedule change is noted, not held
    to the fresh schedule (it was named: the witness read no such record)."""
    from contextlib import closing

    from trainguard.ledger.sqlite_store import SqliteLedger

    rnd = seeded()
    optimizer, at = rnd.choice(["sgd", "adamw"]), rnd.choice([5, 10])
    k, wd_at = rnd.randrange(at - EVERY, at), rnd.randrange(0, at)
    gamma, wd = rnd.choice([0.5, 0.9]), rnd.choice([0.0, 0.2])
    print(f"{optimizer}: gamma -> {gamma} at step {k}, weight_decay -> {wd} at {wd_at}; "
          f"the segment from {at} alone")  # fmt: skip
    model, opt, sched, loader, epoch = parts(optimizer, "step")
    step = make_step(model, opt, sched)
    guard = trainguard.watch(
        model, opt, ledger=str(tmp_path / "ledger.db"), run_id="r", scheduler=sched, key=KEY,
        dataloader=loader, hang_seconds=None, on_alert=lambda alert: None,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(STEPS + 1):
            if s % EVERY == 0:
                guard.checkpoint(tmp_path / f"r-{s}.pt")
            if s < STEPS:
                kw: dict[str, Any] = {}
                if s == wd_at:  # a setting the loop schedules itself: before the step
                    for g in opt.param_groups:
                        g["weight_decay"] = wd
                    kw["hyper"] = {"weight_decay": wd}
                loss = step(next(batches))
                if s == k:
                    sched.gamma = gamma
                    kw["changed"] = ["scheduler"]
                guard.step(loss=loss, batch=None, **kw)
    high = [a for a in guard.alerts if a.severity.name in ("HIGH", "CRITICAL")]
    assert not high, high
    with closing(SqliteLedger(str(tmp_path / "ledger.db"))) as store:
        steps = {r.step: r.payload for r in store.records("r") if r.kind == "step"}
    assert "scheduler" in steps[k].get("changed", []), steps[k]
    assert "weight_decay" in steps[wd_at].get("hyper_changed", []), steps[wd_at]
    verdict = _verify(tmp_path, entry(optimizer, "step"), at, at + EVERY)
    assert verdict.status == "matched", verdict
