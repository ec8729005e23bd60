"""``trainguard replay``: honest runs replay bit for bit; a tampered step is named.

Each run trains a small model for 30 steps on the CPU (shuffled batches,
dropout, AdamW, a step scheduler) with checkpoints at 0, 10, 20 and 30, then
replays it through :func:`build`, the entry point a user would write.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.cli.main import main  # noqa: E402
from trainguard.errors import UsageError  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from, replay  # noqa: E402
from trainguard.monitor.checkpoint import CheckpointError  # noqa: E402
from trainguard.render import render  # noqa: E402

KEY = bytes(range(32))
STEPS, EVERY = 30, 10
SAMPLES, BATCH = 96, 8  # 12 steps per epoch: checkpoints fall mid-epoch
Tamper = Callable[[int, Any, Any], None]


# -- the user's training code ------------------------------------------------------------


def parts() -> tuple[Any, Any, Any, Any, Callable[[int], Any], Callable[[Any], Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator(),
    )

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(1000 + e)  # each epoch's order follows from its number
        return loader

    def step(batch: Any) -> Any:
        xb, yb = batch
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss

    return model, opt, sched, loader, epoch, step


def build(ctx: ReplayContext) -> Replayable:
    """The entry point: fresh objects, and the batches from step ctx.start on."""
    model, opt, sched, loader, epoch, step = parts()
    batches = epochs_from(ctx.start, len(loader), epoch)
    return Replayable(model, opt, scheduler=sched, batches=batches, step=step, dataloader=loader)


def build_more_threads(ctx: ReplayContext) -> Replayable:
    torch.set_num_threads(torch.get_num_threads() + 1)
    return build(ctx)


def build_deterministic(ctx: ReplayContext) -> Any:
    torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())
    run = build(ctx)
    return {"model": run.model, "optimizer": run.optimizer, "scheduler": run.scheduler,
            "batches": run.batches, "step": run.step}  # fmt: skip


def train(
    folder: Path,
    run_id: str,
    tamper: Tamper | None = None,
    carry: Callable[[int, Any, Any, Any, Any], None] | None = None,
    prepare: Callable[[Any, Any, Any, Any], None] | None = None,
    **watch: Any,
) -> str:
    """Train STEPS steps under a guard, checkpointing every EVERY; return the ledger path.

    ``carry(s, model, opt, sched, loader)`` runs after guard.step like ``tamper``, with
    the scheduler and data loader too.
    """
    ledger = str(folder / "ledger.db")
    model, opt, sched, loader, epoch, step = parts()
    guard = trainguard.watch(
        model,
        opt,
        ledger=ledger,
        run_id=run_id,
        scheduler=sched,
        key=KEY,
        dataloader=loader,
        **watch,
    )
    if prepare is not None:
        prepare(model, opt, sched, loader)
    guard.checkpoint(folder / f"{run_id}-0.pt", data_state={"epoch": 0})
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        batch = next(batches)
        loss = step(batch)
        guard.step(loss=loss, batch=batch)
        if tamper is not None:
            tamper(s, model, opt)
        if carry is not None:
            carry(s, model, opt, sched, loader)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"{run_id}-{s + 1}.pt", data_state={"epoch": s // 12})
    guard.close()
    return ledger


# -- sabotage, between steps 16 and 17 ------------------------------------------------------


def nudge_weight(s: int, model: Any, opt: Any) -> None:
    if s == 16:
        with torch.no_grad():
            w = model[3].weight.view(-1)
            w[2] = torch.nextafter(w[2], torch.tensor(10.0))  # one ulp


def scale_moment(s: int, model: Any, opt: Any) -> None:
    if s == 16:
        opt.state[model[0].bias]["exp_avg"].mul_(1.01)


def raise_lr(s: int, model: Any, opt: Any) -> None:
    if s == 16:
        opt.param_groups[0]["lr"] *= 1.5


def zero_bias_before_save(s: int, model: Any, opt: Any) -> None:
    if s == 19:
        with torch.no_grad():
            model[0].bias[3] = 0.0


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("runs")
    ledger = ""
    for run_id, tamper in (
        ("honest", None),
        ("weights", nudge_weight),
        ("moment", scale_moment),
        ("lr", raise_lr),
        ("presave", zero_bias_before_save),
    ):
        ledger = train(folder, run_id, tamper)
    return {"ledger": ledger, "folder": str(folder)}


# -- honest runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "plain"])
def test_honest_run_replays_clean(runs: dict[str, str], key: bytes | None) -> None:
    report = replay(runs["ledger"], "honest", build, key=key)
    assert report.mode == ("keyed" if key else "plain")
    assert [(s.start, s.end, s.status) for s in report.segments] == [
        (0, 10, "matched"),
        (10, 20, "matched"),
        (20, 30, "matched"),
        (30, 30, "matched"),  # the checkpoint the run ends at, checked without steps
    ]
    assert report.steps == STEPS and report.verdict == "matched" and report.exit_code() == 0
    assert report.findings() == []
    assert all(not s.conditions for s in report.segments)


def test_range_and_checkpoint_positions(runs: dict[str, str]) -> None:
    ckpt10 = os.path.join(runs["folder"], "honest-10.pt")
    report = replay(runs["ledger"], "honest", build, key=KEY, start=ckpt10, stop="20")
    assert [(s.start, s.end, s.status) for s in report.segments] == [
        (10, 20, "matched"),
        (20, 20, "matched"),
    ]
    # A start between checkpoints replays from the one before it, straight through.
    report = replay(runs["ledger"], "honest", build, key=KEY, start=15, segmented=False)
    assert [(s.start, s.end, s.status) for s in report.segments] == [
        (10, 30, "matched"),
        (30, 30, "matched"),
    ]
    assert any("step 15 has no checkpoint" in n for n in report.notes)


# -- tampered runs --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "plain"])
def test_weights_edited_between_steps(runs: dict[str, str], key: bytes | None) -> None:
    report = replay(runs["ledger"], "weights", build, key=key)
    d = report.first_divergence
    assert d is not None and d.step == 17 and d.kind == "step"
    before = d.field("before")
    assert before is not None and before.tensors == ("3.weight",)
    assert "outside the optimizer step" in d.cause
    assert any(a.startswith("TG1301") for a in d.alerts)  # the guard saw it too
    bad = report.first_bad_segment
    assert bad is not None and (bad.start, bad.end) == (10, 20)
    # Only up to the first bad segment is replayed: 10 + 8 steps, not 30.
    assert [s.status for s in report.segments] == ["matched", "diverged", "skipped", "skipped"]
    assert report.steps == 18
    assert report.verdict == "diverged" and report.exit_code() == 1
    assert [f.rule for f in report.findings()] == ["TG1510"]


def test_optimizer_state_edited(runs: dict[str, str]) -> None:
    d = replay(runs["ledger"], "moment", build, key=KEY).first_divergence
    assert d is not None and d.step == 17
    assert d.field("before") is None  # the weights were untouched
    after, state = d.field("after"), d.field("optimizer")
    assert after is not None and after.tensors == ("0.bias",)
    assert state is not None and state.tensors == ("exp_avg of 0.bias",)


def test_learning_rate_edited(runs: dict[str, str]) -> None:
    d = replay(runs["ledger"], "lr", build, key=KEY).first_divergence
    assert d is not None and d.step == 17
    lr = d.field("lr")
    assert lr is not None and lr.recorded[0] == pytest.approx(lr.replayed[0] * 1.5)
    assert "learning rate" in d.cause


def test_segments_are_independent(runs: dict[str, str]) -> None:
    report = replay(runs["ledger"], "weights", build, key=KEY, all_segments=True)
    # The checkpoint at 20 holds the edit's effect, so what follows replays clean.
    assert [s.status for s in report.segments] == ["matched", "diverged", "matched", "matched"]


def test_weights_edited_before_a_save(runs: dict[str, str]) -> None:
    report = replay(runs["ledger"], "presave", build, key=KEY)
    assert [s.status for s in report.segments] == ["matched", "matched", "diverged", "skipped"]
    d = report.first_divergence
    assert d is not None and d.kind == "checkpoint" and d.step == 20
    params = d.field("params")
    assert params is not None and params.tensors == ("0.bias",)
    assert [f.rule for f in report.findings()] == ["TG1511"]


@pytest.mark.parametrize(
    ("edited", "statuses"),
    [
        (20, ["matched", "matched", "diverged", "skipped"]),
        (30, ["matched", "matched", "matched", "diverged"]),  # the run's last checkpoint
    ],
)
def test_checkpoint_edited_at_rest(
    runs: dict[str, str], tmp_path: Path, edited: int, statuses: list[str]
) -> None:
    for name in os.listdir(runs["folder"]):
        if name.startswith("honest-"):
            shutil.copy(os.path.join(runs["folder"], name), tmp_path / name)
    state = trainguard.load(tmp_path / f"honest-{edited}.pt")
    state["model"]["3.bias"].add_(1e-6)
    torch.save(state, tmp_path / f"honest-{edited}.pt")
    report = replay(runs["ledger"], "honest", build, key=KEY, checkpoint_dir=str(tmp_path))
    assert [s.status for s in report.segments] == statuses
    d = report.first_divergence
    assert d is not None and d.kind == "checkpoint" and d.step == edited
    assert d.field("file") is not None
    assert [f.rule for f in report.findings()] == ["TG1511"]


# -- conditions that must be held equal -----------------------------------------------------------


def test_other_thread_count_is_reported(runs: dict[str, str]) -> None:
    recorded = torch.get_num_threads()
    report = replay(runs["ledger"], "honest", build_more_threads, key=KEY, stop=10)
    diffs = report.segments[0].conditions
    assert [(c.name, c.recorded, c.replayed) for c in diffs] == [
        ("threads", recorded, recorded + 1)
    ]
    assert report.verdict != "diverged"  # never a false alarm
    assert "threads" in render(report, "text", tool_version="test")
    assert any(f.rule == "TG1512" for f in report.findings())


def test_divergence_under_other_conditions_is_not_comparable(runs: dict[str, str]) -> None:
    report = replay(runs["ledger"], "weights", build_deterministic, key=KEY, start=10, stop=20)
    assert report.verdict == "not-comparable" and report.exit_code() == 2
    assert [c.name for c in report.segments[0].conditions] == ["deterministic"]
    assert [f.rule for f in report.findings()] == ["TG1512"]
    assert "not comparable" in render(report, "text", tool_version="test")


def test_replay_holds_the_recorded_thread_count(runs: dict[str, str]) -> None:
    recorded = torch.get_num_threads()
    torch.set_num_threads(recorded + 1)
    report = replay(runs["ledger"], "honest", build, key=KEY, stop=10)
    assert report.verdict == "matched" and report.segments[0].conditions == []
    assert report.segments[0].held == [f"threads {recorded + 1} -> {recorded}"]
    assert torch.get_num_threads() == recorded + 1  # put back afterwards


# -- loading, keys, errors ----------------------------------------------------------------


def test_checkpoints_load_without_torch_load(
    runs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("replay must load checkpoints through trainguard.load")

    monkeypatch.setattr(torch, "load", refuse)
    assert replay(runs["ledger"], "honest", build, key=KEY, stop=10).verdict == "matched"


def test_checkpoint_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    model, opt, *_ = parts()
    guard = trainguard.watch(model, opt, key=KEY)
    with pytest.raises(CheckpointError, match=r"data_state"):
        guard.checkpoint(tmp_path / "c.pt", data_state={"where": Path("x")})
    guard.close()
    assert not (tmp_path / "c.pt").exists()


def test_wrong_key_is_refused(runs: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="key does not belong"):
        replay(runs["ledger"], "honest", build, key=b"x" * 32)


# -- the command line ---------------------------------------------------------------------------


def test_cli_json(runs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "run.key"
    key_file.write_text(KEY.hex())
    argv = ["replay", "--ledger", runs["ledger"], "--entry", "tests.test_replay:build", "-q"]
    assert main([*argv, "weights", "--key-file", str(key_file), "-f", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "keyed" and out["verdict"] == "diverged"
    assert out["first_divergence"]["step"] == 17
    assert out["first_bad_segment"] == [10, 20]
    fields = {f["field"]: f for f in out["first_divergence"]["fields"]}
    assert fields["before"]["tensors"] == ["3.weight"]
    assert main([*argv, "honest", "--to", "10"]) == 0
    text = capsys.readouterr().out
    assert "plain (no key given" in text and "verdict: matched" in text
    assert main([*argv, "nope"]) == 2
    # The old spelling still works (docs and scripts from before the run was positional).
    assert main([*argv, "--run", "honest", "--to", "10"]) == 0
    assert "--run is deprecated" in capsys.readouterr().err


# -- state carried in checkpoints ------------------------------------------------------------


# What a checkpoint restores besides weights and moments, changed in the training process just
# before the save (after the last step of a segment), so that only the checkpoint carries it.
def _set_attr(obj: str, attr: str, factor: float) -> Callable[..., None]:
    def edit(model: Any, opt: Any, sched: Any, loader: Any) -> None:
        target = {"sched": sched, "group": opt.param_groups[0]}[obj]
        if isinstance(target, dict):
            value = target[attr]
            target[attr] = (
                tuple(v * factor for v in value) if isinstance(value, tuple) else value * factor
            )
        else:
            value = getattr(target, attr)
            setattr(target, attr, [v * factor for v in value] if isinstance(value, list) else
                    type(value)(value * factor))  # fmt: skip

    return edit


def _reseed(which: str, seed: int = 4242) -> Callable[..., None]:
    def edit(model: Any, opt: Any, sched: Any, loader: Any) -> None:
        import random

        import numpy as np

        {
            "torch": lambda: torch.manual_seed(seed),
            "python": lambda: random.seed(seed),
            "numpy": lambda: np.random.seed(seed),
            "loader": lambda: loader.generator.manual_seed(seed),
        }[which]()

    return edit


CARRIED: dict[str, tuple[Callable[..., None], str]] = {
    "gamma": (_set_attr("sched", "gamma", 1.25), "scheduler gamma"),
    "step_size": (_set_attr("sched", "step_size", 2), "scheduler step_size"),
    "base_lrs": (_set_attr("sched", "base_lrs", 1.5), "scheduler base_lrs"),
    "weight_decay": (_set_attr("group", "weight_decay", 10.0), "optimizer group 0 weight_decay"),
    "betas": (_set_attr("group", "betas", 0.99), "optimizer group 0 betas"),
    "eps": (_set_attr("group", "eps", 100.0), "optimizer group 0 eps"),
    "lr": (_set_attr("group", "lr", 1.5), "optimizer group 0 lr"),
    "torch-seed": (_reseed("torch"), "rng torch"),
    "torch-same-seed": (_reseed("torch", 0), "rng torch"),  # parts() seeds 0 too
    "python-seed": (_reseed("python"), "rng python"),
    "numpy-seed": (_reseed("numpy"), "rng numpy"),
    "loader-seed": (_reseed("loader"), "data loader generator"),
}


def test_state_carried_in_a_checkpoint_is_named(tmp_path: Path) -> None:
    """Generative: a random piece of carried state, edited before a random save, is named.

    Replaying the segment before the checkpoint ends in the honest state; the checkpoint
    restores another, so the checkpoint is the divergence, with the value named.
    """
    seed = random_seed()
    rnd = __import__("random").Random(seed)
    kinds = rnd.sample(sorted(CARRIED), 2)
    saved_at = rnd.choice([10, 20])
    print(f"seed {seed}: {kinds} before the save at {saved_at}")

    def carry(s: int, model: Any, opt: Any, sched: Any, loader: Any) -> None:
        if s == saved_at - 1:
            for kind in kinds:
                CARRIED[kind][0](model, opt, sched, loader)

    ledger = train(tmp_path, "carried", carry=carry)
    report = replay(ledger, "carried", build, key=KEY, stop=saved_at + EVERY)
    d = report.first_divergence
    assert d is not None and d.kind == "checkpoint" and d.step == saved_at, (seed, kinds)
    field = d.field("carried")
    assert field is not None
    for kind in kinds:
        assert any(n.startswith(CARRIED[kind][1]) for n in field.tensors), (seed, kind, field)
    assert [f.rule for f in report.findings()] == ["TG1511"]
    assert "differs from what replaying up to step" in d.cause


def test_seeding_before_the_first_checkpoint_is_the_entrys_to_redo(tmp_path: Path) -> None:
    """The first checkpoint is held to what the entry builds (red team A02: a seed or
    weights set before it were taken on trust): a script that seeds between building and
    checkpoint 0 matches with an entry that seeds the same way; with one that does not,
    checkpoint 0 is named for the generator the entry seeds (torch: parts() seeds it).
    Python's generator, which the entry leaves alone, and the data loader's are the
    script's business there."""
    import random

    def prepare(model: Any, opt: Any, sched: Any, loader: Any) -> None:
        torch.manual_seed(5)
        random.seed(5)
        loader.generator.manual_seed(5)

    def build_seeded(ctx: ReplayContext) -> Replayable:
        run = build(ctx)
        torch.manual_seed(5)
        return run

    ledger = train(tmp_path, "seeded", prepare=prepare)
    report = replay(ledger, "seeded", build_seeded, key=KEY, stop=EVERY)
    assert report.verdict == "matched", report.first_divergence
    d = replay(ledger, "seeded", build, key=KEY, stop=EVERY).first_divergence
    assert d is not None and d.step == 0 and d.kind == "checkpoint"
    assert d.field("carried") is not None and d.field("carried").tensors == ("rng torch",)

    def raise_gamma(model: Any, opt: Any, sched: Any, loader: Any) -> None:
        sched.gamma = 0.8  # the whole run trains with it; checkpoint 0 carries it

    ledger = train(tmp_path, "gamma0", prepare=raise_gamma)
    d = replay(ledger, "gamma0", build, key=KEY, stop=EVERY).first_divergence
    assert d is not None and d.step == 0 and d.kind == "checkpoint"
    assert d.field("carried") is not None and d.field("carried").tensors == ("scheduler gamma",)
    assert "the entry point builds" in d.cause


class _Unhooked(torch.optim.AdamW):
    """AdamW's update without the hooks torch wraps around Optimizer.step (the guard's)."""

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(1.5)  # and the update is not the honest one
        return torch.optim.AdamW.step.__wrapped__(self, closure)


def test_bypassed_optimizer_step_is_named_not_blamed_on_every(tmp_path: Path) -> None:
    """An optimizer step that bypasses the guard's hooks: replay names the bypass as the
    cause (the step record says the hooks did not run), not the guard's every= setting."""

    def swap(s: int, model: Any, opt: Any, sched: Any, loader: Any) -> None:
        if s == 13:  # the instance's step: the scheduler's wrapper already sits there
            opt.step = types.MethodType(_Unhooked.step, opt)

    ledger = train(tmp_path, "swapped", carry=swap)
    d = replay(ledger, "swapped", build, key=KEY).first_divergence
    assert d is not None and d.step == 14 and d.kind == "step"
    assert "optimizer hooks did not run" in d.cause and "every=" not in d.cause


def test_random_numbers_drawn_before_a_save_are_not_comparable(tmp_path: Path) -> None:
    """An evaluation between the last step and the save moves generators on (no re-seed):
    replay cannot redo those draws (red team A06: the moved state picks every later random
    number), so the checkpoint is not comparable, never matched, and not called sabotage
    (tests/test_replay_restored.py: an entry that redoes the evaluation matches)."""
    import random

    import numpy as np

    def evaluate(s: int, model: Any, opt: Any, sched: Any, loader: Any) -> None:
        if (s + 1) % EVERY == 0:
            torch.randint(0, 96, (4,))
            random.random()
            np.random.rand(3)

    ledger = train(tmp_path, "evaluated", carry=evaluate)
    report = replay(ledger, "evaluated", build, key=KEY)
    assert report.verdict == "not-comparable", report.first_divergence
    notes = [n for s in report.segments for n in s.notes]
    assert any("rng torch" in n and "no sign of a re-seed" in n for n in notes), notes


def random_seed() -> int:
    import secrets

    return secrets.randbelow(2**32)


# -- runs watched on a budget ---------------------------------------------------------------


def test_budget_run_replays_clean(tmp_path: Path) -> None:
    """Budget mode leaves the full fingerprints out of sampled steps' records: the
    checkpoints' own digests stand in for them."""
    ledger = train(tmp_path, "budget", budget=0.5)
    sampled = [
        r.step
        for r in trainguard.ledger.open_ledger(ledger).records("budget", 0)
        if r.kind == "step" and "after" not in r.payload
    ]
    assert 19 in sampled and 29 in sampled  # the steps before checkpoints 20 and 30
    for key in (KEY, None):
        report = replay(ledger, "budget", build, key=key)
        assert [s.status for s in report.segments] == ["matched"] * 4, report.first_divergence
    # A weight edited before the save at 20 is still a checkpoint that does not match.
    ledger = train(tmp_path, "budget-edit", tamper=zero_bias_before_save, budget=0.5)
    d = replay(ledger, "budget-edit", build, key=KEY).first_divergence
    assert d is not None and d.step == 20 and d.kind == "checkpoint"


def test_a_missing_fingerprint_is_a_difference_unless_on_a_budget() -> None:
    from trainguard.explain.replay import compare as cmp

    rec = {"loss": 1.0, "lr": [0.1]}  # no "after": the guard fingerprints after every step
    rep = {"loss": 1.0, "lr": [0.1], "after": "a", "optimizer": "o"}
    names: tuple[list[str], list[str]] = (["w"], ["w"])
    sides = cmp.Sides("keyed", False, names, names, (None, None), str)
    diffs = cmp.compare_step(rec, rep, sides)
    assert [(d.field, d.recorded) for d in diffs] == [("after", None), ("optimizer", None)]
    assert "hooks did not run" in cmp.cause(diffs, 5, "step")
    on_budget = cmp.Sides("keyed", False, names, names, (None, None), str, budget=True)
    assert cmp.compare_step(rec, rep, on_budget) == []
