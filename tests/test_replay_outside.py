"""Weights written between steps on purpose, declared (``guard.outside_step``): SAM's ascent
and restore, Lookahead's pull to the slow weights.  An honest run replays as matched when
the entry redoes the declared work (``ctx.outside_step``); a declared window is no free
pass: sabotage written inside one is named at its step.

Generated: the idiom, Lookahead's k, the sabotaged step and whether the entry declares are
drawn from a fresh seed (printed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.explain.replay.engine import Replayable, ReplayContext, replay  # noqa: E402

KEY = bytes(range(32))
STEPS, EVERY = 16, 8
Declare = Callable[[str], Any]


def _parts() -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _batches(start: int) -> Iterator[Any]:
    s = start
    while True:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(8, 6, generator=g)
        yield x, x[:, :1] - 2 * x[:, 1:2]
        s += 1


def make_step(model: Any, opt: Any, idiom: str, k: int, declare: Declare, bad: int | None,
              start: int) -> Callable[[Any], Any]:  # fmt: skip
    """The loop body: SAM (perturb, second backward, restore) or Lookahead (every k steps)
    inside a declared window; ``bad``: the step whose window also halves a weight."""
    state: dict[str, Any] = {"step": start, "slow": None}
    mse = torch.nn.functional.mse_loss

    def step(batch: Any) -> Any:
        s = state["step"]
        x, y = batch
        if state["slow"] is None:  # Lookahead's slow weights: the fast ones at a sync point
            state["slow"] = [p.detach().clone() for p in model.parameters()]
        loss = mse(model(x), y)
        opt.zero_grad()
        loss.backward()
        if idiom == "sam":
            with declare("sam"):
                with torch.no_grad():
                    es = [p.grad * 0.05 for p in model.parameters()]
                    for p, e in zip(model.parameters(), es, strict=True):
                        p.add_(e)
                opt.zero_grad()
                mse(model(x), y).backward()
                with torch.no_grad():
                    for p, e in zip(model.parameters(), es, strict=True):
                        p.sub_(e)
                    if s == bad:
                        model[2].weight.mul_(0.5)  # the sabotage, inside the window
            opt.step()
        else:
            opt.step()
            if s % k == k - 1:
                with declare("lookahead"), torch.no_grad():
                    for w, p in zip(state["slow"], model.parameters(), strict=True):
                        w.add_(p - w, alpha=0.5)
                        p.copy_(w)
                    if s == bad:
                        model[2].weight.mul_(0.5)
        state["step"] = s + 1
        return loss

    return step


def train(folder: Path, idiom: str, k: int, bad: int | None) -> str:
    ledger = str(folder / "ledger.db")
    model, opt = _parts()
    guard = trainguard.watch(model, opt, ledger=ledger, run_id="run", key=KEY)
    step = make_step(model, opt, idiom, k, guard.outside_step, bad, 0)
    guard.checkpoint(folder / "run-0.pt")
    batches = _batches(0)
    for s in range(STEPS):
        batch = next(batches)
        guard.step(loss=step(batch), batch=batch)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"run-{s + 1}.pt")
    guard.close()
    return ledger


def entry(idiom: str, k: int, declares: bool) -> Callable[[ReplayContext], Replayable]:
    def build(ctx: ReplayContext) -> Replayable:
        model, opt = _parts()
        declare: Declare = ctx.outside_step if declares else (lambda r: contextlib.nullcontext())
        step = make_step(model, opt, idiom, k, declare, None, ctx.start)
        return Replayable(model, opt, batches=_batches(ctx.start), step=step)

    return build


@pytest.mark.parametrize("sabotage", [False, True], ids=["honest", "sabotage"])
def test_declared_windows_replay_when_honest_and_name_sabotage(
    tmp_path: Path, sabotage: bool
) -> None:
    rnd = seeded()
    idiom, k = rnd.choice(["sam", "lookahead"]), rnd.choice([2, 4])
    windows = [s for s in range(STEPS) if idiom == "sam" or s % k == k - 1]
    bad = rnd.choice(windows) if sabotage else None
    declares = rnd.random() < 0.5
    print(idiom, k, bad, declares)
    ledger = train(tmp_path, idiom, k, bad)
    report = replay(ledger, "run", entry(idiom, k, declares), key=KEY)
    if not sabotage:
        assert report.verdict == "matched", report.first_divergence
        assert report.steps == STEPS
        # An entry that redoes the work without declaring it still matches (the steps'
        # records hold the weights); the report says the windows went uncompared.
        undeclared = any("did not declare" in n for s in report.segments for n in s.notes)
        assert undeclared is not declares
        return
    d = report.first_divergence
    assert report.verdict == "diverged" and d is not None, report.segments
    assert d.step in (bad, bad + 1), (d.step, bad)
    if declares:  # the window's own record is held to the recomputed one
        assert d.step == bad and d.field("outside") is not None, d
        assert "declared window" in d.cause


def test_verify_run_recomputes_declared_windows(tmp_path: Path) -> None:
    """The verifier replays through the same engine: an honest Lookahead run matches, and
    sabotage in a declared window (a random one) is an alert at its step."""
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    rnd = seeded()
    k = rnd.choice([2, 4])
    bad = rnd.choice([s for s in range(STEPS) if s % k == k - 1])
    print(k, bad)
    private, _ = write_keypair(tmp_path / "verifier")
    statuses = []
    for name, sabotage in (("honest", None), ("bad", bad)):
        folder = tmp_path / name
        folder.mkdir()
        verifier = Verifier(
            str(train(folder, "lookahead", k, sabotage)),
            "run",
            entry("lookahead", k, True),
            signing_key=str(private),
            secret=secret_from(private.read_bytes()),
            rate=1.0,
            run_key=KEY,
        )
        try:
            verifier.poll()
        finally:
            verifier.close()
        statuses.append([v.status for v in verifier.summary.verdicts])
        if sabotage is not None:
            # (A later segment may diverge too: the sabotage left the slow weights behind.)
            rules = {a["rule"] for a in verifier.summary.alerts}
            assert rules == {"TG1510"}, verifier.summary.alerts
            first = next(v for v in verifier.summary.verdicts if v.status == "diverged")
            assert first.step == bad and first.start == bad // EVERY * EVERY
    assert statuses[0] == ["matched"] * (STEPS // EVERY)
    assert "diverged" in statuses[1]


def test_window_records_are_compared_field_by_field() -> None:
    """compare_outside on generated window records: equal ones are no difference; a changed
    reason, tensor list, digest of the weights after (keyed or plain), or a further
    optimizer's tensors or (keyed) digest is."""
    from trainguard.explain.replay.compare import compare_outside

    rnd = seeded()

    def hexd() -> str:
        return f"{rnd.getrandbits(128):032x}"

    names = [f"{i}.weight" for i in range(rnd.randrange(1, 6))]
    written = rnd.sample(names, rnd.randrange(1, len(names) + 1))
    window = {"reason": rnd.choice(["sam", "lookahead"]), "tensors": written,
              "count": len(written), "after_update": rnd.random() < 0.5, "after": hexd(),
              "plain": {"after": hexd()},
              "optimizers": {"1": {"tensors": ["head.weight"], "after": hexd()}}}  # fmt: skip
    for mode in ("keyed", "plain"):
        assert compare_outside([window], [dict(window)], mode) == []
    changes = {
        "reason": ({"reason": "other"}, {"keyed", "plain"}),
        "tensors": ({"tensors": written[:-1] or ["x"], "count": 9}, {"keyed", "plain"}),
        "after": ({"after": hexd()}, {"keyed"}),
        "plain": ({"plain": {"after": hexd()}}, {"plain"}),
        "lane digest": (
            {"optimizers": {"1": {"tensors": ["head.weight"], "after": hexd()}}},
            {"keyed"},
        ),
        "lane tensors": ({"optimizers": {"1": {"tensors": [], "after": "x"}}}, {"keyed", "plain"}),
    }
    name = rnd.choice(sorted(changes))
    change, seen_in = changes[name]
    print(name)
    for mode in ("keyed", "plain"):
        diffs = compare_outside([window], [{**window, **change}], mode)
        assert bool(diffs) == (mode in seen_in), (name, mode, diffs)
    assert compare_outside([window], [window, window], "keyed")  # a window more
    assert compare_outside([], [window], "plain")  # a window the run never declared
    assert compare_outside([window], [], "keyed") == []  # undeclared entry: noted by replay
