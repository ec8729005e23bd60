"""Honest training runs in the combinations users run, and their honest replay entry.

One :class:`Combo` is an optimizer (SGD, Adam, AdamW), a scheduler or none, ``watch``
exact or on a budget, a checkpoint every 2 or 3 steps, gradient accumulation or not,
clipping or not, the data order from a loader's own generator seeded per epoch, a
``DistributedSampler`` with ``set_epoch`` or a ``RandomSampler`` with its own generator,
and an evaluation in eval mode under ``torch.random.fork_rng()`` before each save or
none.  :func:`judge` trains it, replays it in segment mode and runs ``trainguard
verify-run --rate 1`` on it; an honest run must come out matched everywhere, with no
alert (tests/test_verifier_honest.py draws one per CI run, bench/honest_matrix.py
sweeps many).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import trainguard
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay

KEY = bytes(range(32))
SAMPLES, BATCH = 48, 8  # 6 steps per epoch: a run of 6-8 steps crosses an epoch's end


@dataclass(frozen=True)
class Combo:
    optimizer: str  # sgd | adam | adamw
    scheduler: bool
    budget: float | None  # watch(budget=...) or exact
    every: int  # a checkpoint every this many steps
    accumulate: int  # micro-batches per optimizer step (1: none)
    clip: bool
    # generator (the loader's own, seeded per epoch) | sampler (DistributedSampler,
    # set_epoch) | random-sampler (a RandomSampler with its own generator, seeded per epoch)
    data: str
    evaluate: bool  # an evaluation under fork_rng before each save
    steps: int


def draw(rnd: random.Random) -> Combo:
    return Combo(
        optimizer=rnd.choice(["sgd", "adam", "adamw"]),
        scheduler=rnd.random() < 0.5,
        budget=rnd.choice([None, 0.02]),
        every=rnd.choice([2, 3]),
        accumulate=rnd.choice([1, 2]),
        clip=rnd.random() < 0.5,
        data=rnd.choice(["generator", "sampler", "random-sampler"]),
        evaluate=rnd.random() < 0.5,
        steps=rnd.randint(6, 8),
    )


def parts(c: Combo) -> tuple[Any, ...]:
    """Model, optimizer, scheduler (or None), loader and its per-epoch batches, built
    fresh as training and the entry both build them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(12, 1)
    )
    if c.optimizer == "sgd":
        opt: Any = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif c.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7) if c.scheduler else None
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :1] * 3 - x[:, 2:3])
    if c.data == "random-sampler":  # a sampler with its own generator, seeded per epoch
        own = torch.Generator()
        loader = torch.utils.data.DataLoader(
            data, batch_size=BATCH, sampler=torch.utils.data.RandomSampler(data, generator=own)
        )

        def epoch(e: int) -> Any:
            own.manual_seed(2000 + e)
            return loader

    elif c.data == "sampler":
        sampler: Any = torch.utils.data.DistributedSampler(
            data, num_replicas=1, rank=0, shuffle=True, seed=11
        )
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)

        def epoch(e: int) -> Any:
            sampler.set_epoch(e)
            return loader

    else:
        loader = torch.utils.data.DataLoader(
            data, batch_size=BATCH, shuffle=True, generator=torch.Generator()
        )

        def epoch(e: int) -> Any:
            loader.generator.manual_seed(1000 + e)
            return loader

    return model, opt, sched, loader, epoch


def make_step(c: Combo, model: Any, opt: Any, sched: Any) -> Any:
    def step(batch: Any) -> Any:
        xb, yb = batch
        opt.zero_grad()
        total = torch.zeros(())
        for xs, ys in zip(xb.chunk(c.accumulate), yb.chunk(c.accumulate), strict=True):
            loss = torch.nn.functional.mse_loss(model(xs), ys) / c.accumulate
            loss.backward()
            total = total + loss.detach()
        if c.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if sched is not None:
            sched.step()
        return total

    return step


def evaluate(model: Any) -> None:
    """An evaluation before a save, in eval mode, that draws random numbers (a random
    probe) off the training's generators."""
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():
        model(torch.randn(4, 6))
    model.train()


def train(c: Combo, folder: Path, run_id: str) -> str:
    """The run, watched, into ``folder``/ledger.db; returns the ledger's path."""
    model, opt, sched, loader, epoch = parts(c)
    step = make_step(c, model, opt, sched)
    ledger = str(folder / "ledger.db")
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id=run_id, scheduler=sched, key=KEY,
        dataloader=loader, hang_seconds=None, budget=c.budget,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(c.steps + 1):
            if s % c.every == 0 or s == c.steps:
                if c.evaluate and s > 0:
                    evaluate(model)
                guard.checkpoint(folder / f"{run_id}-{s}.pt")
            if s < c.steps:
                guard.step(loss=step(next(batches)), batch=None)
    return ledger


def entry(c: Combo) -> Any:
    def build(ctx: ReplayContext) -> Replayable:
        model, opt, sched, loader, epoch = parts(c)
        return Replayable(
            model, opt, scheduler=sched, batches=epochs_from(ctx.start, len(loader), epoch),
            step=make_step(c, model, opt, sched), dataloader=loader,
        )  # fmt: skip

    return build


COMBO_ENV = "TRAINGUARD_HONEST_COMBO"  # the combination `build` builds, as JSON


def build(ctx: ReplayContext) -> Replayable:
    """The entry as ``--entry tests.honest_runs:build`` names it: the combination in
    ``$TRAINGUARD_HONEST_COMBO``."""
    return entry(Combo(**json.loads(os.environ[COMBO_ENV])))(ctx)  # type: ignore[no-any-return]


def judge(c: Combo, folder: Path) -> list[str]:
    """Train ``c``, replay it (segment mode) and run ``trainguard verify-run --rate 1`` on
    it: what was not matched, or alerted, as lines (empty: all matched, exit 0)."""
    from trainguard.cli.main import main
    from trainguard.signing.keys import write_keypair

    print(f"combo {asdict(c)}")
    ledger = train(c, folder, "h")
    out: list[str] = []
    report = replay(ledger, "h", entry(c), key=KEY, segmented=True, checkpoint_dir=str(folder))
    if report.verdict != "matched" or report.exit_code() != 0:
        d = report.first_divergence
        out.append(f"replay: {report.verdict} at {d.step if d else None}: {d.cause if d else ''}")
    private, _ = write_keypair(folder / "verifier")
    (folder / "run.key").write_text(KEY.hex())
    os.environ[COMBO_ENV] = json.dumps(asdict(c))
    try:
        code = main([
            "verify-run", "h", "--ledger", ledger, "--entry", "tests.honest_runs:build",
            "--key", str(private), "--run-key-file", str(folder / "run.key"), "--rate", "1",
            "--checkpoints", str(folder), "-q", "-f", "json", "-o", str(folder / "v.json"),
        ])  # fmt: skip
    finally:
        del os.environ[COMBO_ENV]
    summary = json.loads((folder / "v.json").read_text())
    out += [f"verify-run: {v['status']} {v['start']}..{v['end']} at {v['step']}: {v['cause']}"
            for v in summary["verdicts"] if v["status"] != "matched"]  # fmt: skip
    out += [f"verify-run alert {a['rule']}: {a['message']}" for a in summary["alerts"]]
    out += [f"verify-run problem: {p}" for p in summary.get("problems", [])]
    if code != 0 and not out:
        out.append(f"verify-run exit {code}")
    return out
