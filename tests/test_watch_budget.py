"""``watch(..., budget=)``: exact checks at keyed random boundaries, version counters at all.

Small CPU runs.  A tiny budget makes exact checks rare after the warm-up, so
what the version counters catch on their own shows; ``budget=1.0`` checks
every boundary exactly.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.ledger import open_ledger  # noqa: E402
from trainguard.monitor.budget import (  # noqa: E402
    CHUNK_BYTES,
    MARGIN,
    SPARSEST,
    WARMUP_STEPS,
    ChunkSample,
    Schedule,
    VersionWatch,
    chances,
    chunk_count,
)

RARE = 1e-9  # after the warm-up, practically no boundary gets an exact check
EDIT_AT = 40  # after the warm-up of 16 steps


def rules(guard: Any) -> list[tuple[str, int]]:
    """The alerts, without single medium step-time alerts (a shared machine's pauses)."""
    return [
        (a.rule, a.step)
        for a in guard.alerts
        if not (a.rule == "TG1307" and a.severity < Severity.HIGH)
    ]


def test_chunk_samples_are_keyed_reproducible_and_sized() -> None:
    named = [("big", torch.zeros(3 * CHUNK_BYTES // 4 + 5)), ("small", torch.zeros(10))]
    sampler = ChunkSample(bytes(range(32)))
    assert sampler.total(named) == 5  # 4 chunks of the big tensor, 1 of the small one
    picks = [[n for n, _ in sampler.choose(named, s, 2)] for s in range(200)]
    assert picks == [[n for n, _ in sampler.choose(named, s, 2)] for s in range(200)]
    assert all(len(p) == 2 for p in picks)
    other = ChunkSample(bytes(32))
    assert picks != [[n for n, _ in other.choose(named, s, 2)] for s in range(200)]
    views = sampler.choose(named, 7, 5)
    assert sum(v.numel() for _, v in views) == sum(t.numel() for _, t in named)


def test_chunk_count_follows_budget_step_time_and_chunk_cost() -> None:
    assert chunk_count(0.02, 1.0, 0.001, 1000) == 10  # 0.02 * 1.0 / (2 * 0.001)
    assert chunk_count(0.02, 1.0, 1e-9, 1000) == 1000
    assert chunk_count(1e-9, 1.0, 0.001, 1000) == 1
    assert chunk_count(0.02, None, 0.001, 1000) == 1000


def test_version_watch_sees_in_place_writes_and_swapped_storage() -> None:
    a, b = torch.zeros(4), torch.zeros(4)
    watch = VersionWatch()
    watch.remember([("a", a), ("b", b)])
    assert watch.changed([("a", a), ("b", b)]) == []
    a.add_(1)
    assert watch.changed([("a", a), ("b", b)]) == ["a"]
    watch.remember([("a", a), ("b", b)])
    assert watch.changed([("a", a), ("b", torch.zeros(4))]) == ["b"]


def test_honest_run_on_a_tight_budget_is_quiet_and_checks_few_boundaries() -> None:
    guard = sc.run(120, budget=RARE)
    assert rules(guard) == []
    assert 16 <= guard.checked_boundaries <= 20  # the warm-up, then (nearly) none


def _edit(how: str) -> sc.Sabotage:
    """One edit between steps ``EDIT_AT - 1`` and ``EDIT_AT``."""

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if step != EDIT_AT - 1:
            return
        with torch.no_grad():
            if how == "in-place":
                model[3].weight.mul_(1.01)
            elif how == "data":
                model[3].weight.data.mul_(1.01)  # bypasses the version counter
            elif how == "swap":
                model[3].bias.data = model[3].bias.data.clone() + 0.1
            elif how == "moment":
                p = model[3].weight
                opt.state[p]["exp_avg"].mul_(-1.0)

    return sabotage


@pytest.mark.parametrize(
    ("how", "rule", "tensor"),
    [
        ("in-place", "TG1301", "3.weight"),
        ("swap", "TG1301", "3.bias"),
        ("moment", "TG1302", "exp_avg"),
    ],
)
def test_version_counters_catch_edits_between_steps(how: str, rule: str, tensor: str) -> None:
    """The version counters run at every boundary in budget mode too: a single edit
    between two steps is named at its step, whatever the schedule draws (sampled, a
    one-off edit at a boundary left out was never seen again: red team 4 A19)."""
    guard = sc.run(60, budget=RARE, key=bytes(range(32)), sabotage=_edit(how))
    hits = [a for a in guard.alerts if a.rule == rule and a.evidence.get("via") == "version"]
    assert hits and hits[0].step == EDIT_AT
    assert any(tensor in t for t in hits[0].evidence["tensors"])
    assert min(a.step for a in guard.alerts if a.rule == rule) >= EDIT_AT


def test_a_data_write_is_seen_by_the_sampled_chunks() -> None:
    """``.data`` bypasses the version counter; the keyed chunk sample still reads the bits
    (a budget this model fits in whole: every chunk is sampled)."""
    guard = sc.run(60, budget=1.0, sabotage=_edit("data"))
    hits = [a for a in guard.alerts if a.rule == "TG1301"]
    assert [(a.step, a.evidence.get("via")) for a in hits] == [(EDIT_AT, "sample")]
    assert guard.sampled_share == 1.0


def test_on_a_tight_budget_a_data_write_is_caught_only_if_its_chunk_is_sampled() -> None:
    key = bytes(range(32))
    guard = sc.run(60, budget=RARE, key=key, sabotage=_edit("data"))
    hits = [a for a in guard.alerts if a.rule == "TG1301"]
    assert guard.sampled_share < 0.2  # one chunk of the model's and optimizer's, if any
    assert all(a.step == EDIT_AT and a.evidence.get("via") == "sample" for a in hits)


def test_on_a_budget_the_probe_runs_at_the_warm_up_and_at_the_drawn_steps() -> None:
    """A budget far below the guard's fixed cost: the direction probe runs at every
    warm-up step, then at the steps the schedule draws (1 in SPARSEST on average), and
    catches the flipped clipping at every step it runs."""
    undo = sc.plant_incident_payload(world_size=8, threshold=4)
    try:
        guard = sc.run(40, budget=RARE)
    finally:
        undo()
    assert ("TG1306", 0) in rules(guard)
    # One alert per window, counting every step it fired at (alerts are aggregated).
    flips = [a for a in guard.alerts if a.rule == "TG1306" and "tensors" in a.evidence]
    ran = guard.schedule.runs_at["direction"]
    assert WARMUP_STEPS <= ran < 40
    assert [(a.step, a.count) for a in flips] == [(0, ran)]


def test_the_schedule_shares_the_allowance_by_measured_cost() -> None:
    # Cheap units run at every step; the rest share what is left equally.
    chance, share = chances(1.0, {"a": 0.1, "b": 0.2, "c": 2.0, "d": 4.0})
    assert chance["a"] == chance["b"] == 1.0
    assert share == pytest.approx(0.35)  # (1.0 - 0.3) / 2
    assert chance["c"] == pytest.approx(0.175) and chance["d"] == pytest.approx(0.0875)
    assert sum(chance[u] * c for u, c in {"c": 2.0, "d": 4.0}.items()) == pytest.approx(0.7)
    # A dearer unit is scheduled less often; nothing falls below the floor.
    assert chances(1.0, {"a": 0.1, "c": 8.0})[0]["c"] < chance["c"]
    assert chances(-1.0, {"a": 0.1, "c": 8.0})[0] == {"a": 1 / SPARSEST, "c": 1 / SPARSEST}
    # Not measured yet (0 s): runs, so that it gets measured.
    assert chances(0.0, {"new": 0.0, "c": 2.0})[0]["new"] == 1.0


def test_the_schedule_follows_measured_costs_with_keyed_draws() -> None:
    """Generative: random unit costs and budgets; the draws are the key's, the rate
    the controller's, and the expected cost fits the allowance."""
    import os
    import random

    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    for _ in range(8):
        units = [f"u{i}" for i in range(rnd.randint(1, 6))]
        key = rnd.randbytes(32)
        schedule = Schedule(key, rnd.choice([0.01, 0.02, 0.1]), units)
        cost = {u: rnd.uniform(1e-5, 5e-3) for u in units}
        fixed, median = rnd.uniform(0.0, 2e-3), rnd.uniform(5e-3, 0.5)
        for _ in range(30):  # steps: every unit runs once, then the costs settle
            for u in units:
                schedule.charge(u, cost[u])
            schedule.update(fixed + sum(cost.values()), median)
        allowance = MARGIN * schedule.budget * median - fixed
        expected = sum(schedule.chance[u] * cost[u] for u in units)
        floor = sum(cost.values()) / SPARSEST
        assert expected <= max(allowance, 0.0) * (1 + 1e-6) + floor
        steps = range(WARMUP_STEPS, WARMUP_STEPS + 2000)
        picks = [schedule.runs(s) for s in steps]
        assert picks == [schedule.runs(s) for s in steps]  # reproducible from the key
        for u in units:
            rate = sum(u in p for p in picks) / len(picks)
            assert abs(rate - schedule.chance[u]) < 0.05
        other = Schedule(rnd.randbytes(32), schedule.budget, units)
        other.chance = dict(schedule.chance)
        if any(0.05 < p < 0.95 for p in schedule.chance.values()):
            assert picks != [other.runs(s) for s in steps]  # another key, other steps


def test_unchecked_steps_leave_their_fingerprints_out_of_the_ledger(tmp_path: Any) -> None:
    url = str(tmp_path / "runs.db")
    sc.run(60, budget=RARE, ledger=url, run_id="b")
    ledger = open_ledger(url)
    steps = [r for r in ledger.records("b", 0) if r.kind == "step"]
    with_after = [r.step for r in steps if "after" in r.payload]
    assert len(steps) == 60
    assert set(range(16)) <= set(with_after) and len(with_after) < 25
    start = next(r for r in ledger.records("b", 0) if r.kind == "run-start")
    assert start.payload["budget"] == RARE


def test_grad_norm_from_the_loop_is_recorded_when_not_measured(tmp_path: Any) -> None:
    import trainguard

    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    url = str(tmp_path / "runs.db")
    guard = trainguard.watch(model, opt, ledger=url, run_id="g", measure_grad_norm=False)
    x, y = sc.make_data()
    norms = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        guard.step(loss=loss, grad_norm=norm)
        norms.append(float(norm))
    guard.close()
    recorded = [
        r.payload["grad_norm"] for r in open_ledger(url).records("g", 0) if r.kind == "step"
    ]
    assert recorded == norms


def test_budget_must_be_a_fraction() -> None:
    import trainguard
    from trainguard.errors import TrainguardError

    model = sc.make_model()
    with pytest.raises(TrainguardError, match="budget"):
        trainguard.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), budget=2.0)


def test_a_run_watched_on_a_budget_replays_and_a_tampered_one_diverges(tmp_path: Any) -> None:
    """Replay compares what the ledger holds: loss and gradient norm at every step, the
    fingerprints where the budget took them."""
    import trainguard
    from tests.test_replay import KEY, build, parts
    from trainguard.explain.replay.engine import epochs_from, replay

    def train(run_id: str, tamper_at: int | None) -> str:
        ledger = str(tmp_path / "ledger.db")
        model, opt, sched, loader, epoch, step = parts()
        guard = trainguard.watch(
            model, opt, ledger=ledger, run_id=run_id, scheduler=sched, key=KEY,
            dataloader=loader, budget=RARE,
        )  # fmt: skip
        guard.checkpoint(tmp_path / f"{run_id}-0.pt", data_state={"epoch": 0})
        batches = epochs_from(0, len(loader), epoch)
        for s in range(30):
            batch = next(batches)
            guard.step(loss=step(batch), batch=batch)
            if s == tamper_at:
                with torch.no_grad():
                    model[3].weight.data.mul_(1.001)  # invisible to the version counter
        guard.close()
        return ledger

    honest = replay(train("honest", None), "honest", build, key=KEY)
    assert honest.verdict == "matched", honest
    tampered = replay(train("tampered", 20), "tampered", build, key=KEY)
    assert tampered.verdict == "diverged"
    # Step 21 was not fingerprinted (budget), so the changed loss gives it away there.
    assert tampered.first_divergence is not None and tampered.first_divergence.step == 21


def test_an_exact_run_with_every_replays_clean(tmp_path: Any) -> None:
    """Only a fingerprinted "before" goes into a step record (every=3: one step in three)."""
    import trainguard
    from tests.test_replay import KEY, build, parts
    from trainguard.explain.replay.engine import epochs_from, replay

    ledger = str(tmp_path / "ledger.db")
    model, opt, sched, loader, epoch, step = parts()
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id="e", scheduler=sched, key=KEY, dataloader=loader,
        every=3,
    )  # fmt: skip
    guard.checkpoint(tmp_path / "e-0.pt", data_state={"epoch": 0})
    batches = epochs_from(0, len(loader), epoch)
    for _ in range(20):
        batch = next(batches)
        guard.step(loss=step(batch), batch=batch)
    guard.close()
    steps = [r for r in open_ledger(ledger).records("e", 0) if r.kind == "step"]
    assert [r.step for r in steps if "before" in r.payload] == list(range(0, 20, 3))
    assert replay(ledger, "e", build, key=KEY).verdict == "matched"


def test_a_run_with_loop_grad_norms_replays_clean(tmp_path: Any) -> None:
    """measure_grad_norm=False: the ledger holds the loop's norms; replay does not compare them."""
    import trainguard
    from tests.test_replay import KEY, build, parts
    from trainguard.explain.replay.engine import epochs_from, replay

    ledger = str(tmp_path / "ledger.db")
    model, opt, sched, loader, epoch, step = parts()
    guard = trainguard.watch(
        model, opt, ledger=ledger, run_id="n", scheduler=sched, key=KEY, dataloader=loader,
        measure_grad_norm=False,
    )  # fmt: skip
    guard.checkpoint(tmp_path / "n-0.pt", data_state={"epoch": 0})
    batches = epochs_from(0, len(loader), epoch)
    for _ in range(12):
        batch = next(batches)
        guard.step(loss=step(batch), batch=batch, grad_norm=123.0)
    guard.close()
    assert replay(ledger, "n", build, key=KEY).verdict == "matched"


def test_honest_runs_with_units_skipping_half_the_steps_raise_nothing_high(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Generative: every unit runs at a keyed half of the steps after the warm-up (what
    a budget between the fixed costs and the full cost gives), so the checks see skipped
    steps between checked ones: moments, streaks, seeds and declared re-seeds carry
    over honestly."""
    import os
    import random

    import trainguard.monitor.budget as budget

    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    monkeypatch.setattr(budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, 0.5), 0))
    for name in rnd.sample(sorted(sc.OPTIMIZERS), 3):
        options: dict[str, Any] = {"optimizer": name, "budget": 0.02}
        if rnd.random() < 0.5:
            options["scheduler"] = rnd.choice(sorted(sc.SCHEDULERS))
        elif rnd.random() < 0.5:
            options["manual_lr"] = lambda s: 1e-3 * (1 + s % 7)
        if rnd.random() < 0.5:
            options["reseed_every"] = rnd.choice([5, 13])
        guard = sc.run(50, **options)
        assert [a for a in guard.alerts if a.severity >= Severity.HIGH] == [], (name, options)
        ran = guard.schedule.runs_at  # 16 warm-up steps, then about half of 34
        assert all(WARMUP_STEPS + 5 < n < 50 - 5 for n in ran.values()), ran
