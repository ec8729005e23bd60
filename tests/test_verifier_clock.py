"""The verifier holds steps' recorded durations to the PostgreSQL server's own record times
(TG1513): a guard clock patched to hide sleeps is named; honest runs, slow steps the guard
sees, and records written late after an outage are not."""

from __future__ import annotations

import random
import secrets
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from trainguard.explain.verifier.clock import CLOCK_SLACK_S, SETTLE_S, ServerClock
from trainguard.ledger.chain import GENESIS, Record
from trainguard.ledger.outage import OUTAGE_KIND


def _record(rank: int, seq: int, kind: str, step: int | None, wall: float, server: float,
            payload: dict[str, Any] | None = None) -> Record:  # fmt: skip
    return Record("r", rank, seq, kind, step, wall, payload or {}, GENESIS, GENESIS, server)


class _Rank:
    """A synthetic rank: steps end on the client's clock, reach the server ``delay`` later."""

    def __init__(self, rank: int, rnd: random.Random, offset: float) -> None:
        self.rank, self.rnd, self.seq = rank, rnd, 0
        self.real = 1000.0  # the true time (the server's clock)
        self.offset = offset  # the client's wall clock minus the server's
        self.records: list[Record] = []

    def step(self, step: int, seconds: float, hidden: float = 0.0) -> None:
        self.real += seconds + hidden
        delay = self.rnd.uniform(0.001, CLOCK_SLACK_S / 4)  # checks, round trip, commit
        wall = self.real + self.offset + self.rnd.uniform(0, 0.002)
        payload = {"step_time": seconds}
        self.add("step", step, wall, self.real + delay, payload)

    def add(self, kind: str, step: int | None, wall: float, server: float,
            payload: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.records.append(_record(self.rank, self.seq, kind, step, wall, server, payload))
        self.seq += 1


def _judge(ranks: list[_Rank]) -> list[tuple[str, str, int, dict[str, Any]]]:
    check = ServerClock()
    order = [r for rank in ranks for r in rank.records]
    for record in order:
        check.feed(record)
    return check.judge(final=True)


def test_hidden_time_is_named_and_honest_runs_are_silent() -> None:
    """Generative: ranks of random step times and random store delays (up to a quarter of
    the slack); on one rank, 0 to 3 stretches of steps hide sleeps (one long one, or short
    ones in many steps) adding up past the slack.  Only that rank is named, high."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    world, steps = rnd.randint(1, 3), rnd.randint(60, 200)
    liar = rnd.randrange(world)
    shape = rnd.choice(["one", "spread", "confined"])
    print(f"seed {seed}: {world} ranks, {steps} steps, rank {liar} hides ({shape})")
    ranks = [_Rank(r, rnd, rnd.uniform(-5, 5)) for r in range(world)]
    lied = set()
    for s in range(steps):
        for rank in ranks:
            hidden = 0.0
            if rank.rank == liar and s >= 10:
                if shape == "one" and s == 10:
                    hidden = CLOCK_SLACK_S * rnd.uniform(1.3, 3)
                elif shape == "spread":
                    hidden = CLOCK_SLACK_S * 2 / (steps - 10)
                elif shape == "confined" and s % 7 == 0:
                    hidden = CLOCK_SLACK_S * 14 / (steps - 10)
            if hidden:
                lied.add(s)
            rank.step(s, rnd.uniform(0.01, 2.0), hidden)
    honest_alerts = _judge([r for r in ranks if r.rank != liar])
    assert honest_alerts == [], honest_alerts
    alerts = _judge(ranks)
    assert [(a[0], a[3]["rank"], a[3]["compared"]) for a in alerts] == [
        ("high", liar, "step_time")
    ], alerts
    first, last = alerts[0][3]["steps"]
    assert first < max(lied) and last >= min(lied), (alerts[0], sorted(lied)[:3])


def test_records_written_late_after_an_outage_are_not_compared() -> None:
    """Generative: a server outage of minutes; the rank's records reach the server in one
    burst after it, then the ledger-outage record.  Silent; a lie after it is still named."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    outage_at, outage_len = rnd.randint(5, 30), rnd.randint(3, 20)
    print(f"seed {seed}: outage at step {outage_at} for {outage_len} steps")
    rank = _Rank(0, rnd, 0.0)
    for s in range(outage_at):
        rank.step(s, rnd.uniform(0.5, 3))
    queued = []
    for s in range(outage_at, outage_at + outage_len):
        rank.real += rnd.uniform(5, 20)
        queued.append((s, rank.real, rnd.uniform(5, 20)))
    back = rank.real + rnd.uniform(1, 60)
    for i, (s, wall, took) in enumerate(queued):
        rank.add("step", s, wall, back + 0.001 * i, {"step_time": took})
    payload = {"first": queued[0][1], "last": queued[-1][1], "written_late": len(queued)}
    rank.add(OUTAGE_KIND, None, back, back + 0.001 * len(queued), payload)
    rank.real = back + 0.01 * len(queued)
    after = outage_at + outage_len
    for s in range(after, after + 20):
        rank.step(s, rnd.uniform(0.5, 3))
    assert _judge([rank]) == []
    for s in range(after + 20, after + 40):
        rank.step(s, rnd.uniform(0.5, 3), hidden=CLOCK_SLACK_S / 10)
    (alert,) = _judge([rank])
    assert alert[0] == "high" and alert[3]["gaps_excused_by_outages"] >= 1
    assert alert[3]["steps"][1] >= after + 20


def test_a_burst_is_judged_only_once_its_outage_record_can_have_arrived() -> None:
    """Records newer than SETTLE_S before the stream's newest are not judged mid-run: the
    outage record that excuses a late burst is written right after it."""
    rank = _Rank(0, random.Random(1), 0.0)
    for s in range(5):
        rank.step(s, 1.0)
    rank.add("step", 5, rank.real + 1, rank.real + SETTLE_S / 2, {"step_time": 1.0})
    check = ServerClock()
    for record in rank.records:
        check.feed(record)
    assert check.judge() == []  # not settled yet
    assert [a[0] for a in check.judge(final=True)] == ["high", "medium"]  # the run ended


# -- against the real server --------------------------------------------------------------
def _train(url: str, run_id: str, sleeps: dict[int, float], hide: bool) -> None:
    import torch

    import trainguard
    from tests import verifier_train as vt
    from trainguard.monitor import clock

    model, opt, sched, loader, epoch = vt.parts()
    step = vt.make_step(model, opt, sched)
    hidden = [0.0]
    real = clock._PERF_COUNTER
    if hide:  # what a saboteur does after trainguard is imported (not a time.* patch)
        clock._PERF_COUNTER = lambda: real() - hidden[0]
    try:
        guard = trainguard.watch(
            model, opt, ledger=url, run_id=run_id, scheduler=sched, key=vt.KEY,
            dataloader=loader, hang_seconds=None,
        )  # fmt: skip
        batches = vt.epochs_from(0, len(loader), epoch)
        for s in range(24):
            loss = step(next(batches))
            if s in sleeps:
                time.sleep(sleeps[s])
                hidden[0] += sleeps[s] if hide else 0.0
            guard.step(loss=loss, batch=None)
        guard.close()
    finally:
        clock._PERF_COUNTER = real
    del torch


def test_a_clock_patched_to_hide_sleeps_is_caught_on_postgres(tmp_path: Path) -> None:
    """Generative: sleeps in random steps adding up past the slack; hidden from the guard's
    clock they are TG1513 high; the same sleeps seen by the guard raise no TG1513."""
    pytest.importorskip("torch")
    from tests import verifier_train as vt
    from tests.test_ledger_support import postgres_schema
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    where = rnd.sample(range(1, 24), rnd.randint(1, 4))
    total = CLOCK_SLACK_S * rnd.uniform(1.4, 1.8)
    sleeps = {s: total / len(where) for s in where}
    print(f"seed {seed}: {total:.2f} s of sleep in steps {sorted(where)}")
    private, _ = write_keypair(tmp_path / "verifier")
    with postgres_schema() as url:
        found = {}
        for run_id, hide in (("honest", False), ("hiding", True)):
            _train(url, run_id, sleeps, hide)
            verifier = Verifier(
                url, run_id, vt.build, signing_key=str(private),
                secret=secret_from(private.read_bytes()), rate=1.0, run_key=vt.KEY,
            )  # fmt: skip
            with closing(verifier):
                verifier.poll()
                assert verifier.summary.finished
                found[run_id] = [(a["rule"], a["severity"]) for a in verifier.summary.alerts]
    assert found["honest"] == [], found
    assert found["hiding"] == [("TG1513", "high")], found
