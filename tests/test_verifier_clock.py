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
    # The stretch named holds the hidden time: it starts before a lying step and ends at one.
    assert (first is None or first < max(lied)) and min(lied) <= last <= max(lied), (
        alerts[0], sorted(lied)[:3])  # fmt: skip
    if shape == "one":  # one sleep: the stretch is that step alone
        assert alerts[0][3]["steps"] == [9, 10], alerts[0]


class _Sim:
    """A synthetic rank with a real ledger server's behaviour: records are stored a short
    delay after they are made, queued while the server is down (``down``: intervals of
    the true time) and written in a burst followed by a ledger-outage record when it is
    back (ledger/outage.py); a saboteur may hide time, hold records back, drop them or
    write outage records of its own."""

    def __init__(self, rnd: random.Random, down: list[tuple[float, float]],
                 hold_start: bool = False) -> None:  # fmt: skip
        self.rank, self.rnd, self.down = _Rank(0, rnd, rnd.uniform(-5, 5)), rnd, down
        self.queue: list[tuple[str, int | None, float, dict[str, Any]]] = []
        self.held: list[tuple[str, int | None, float, dict[str, Any]]] = []
        self.claims: dict[int, float] = {}
        self.holding = hold_start
        self.put(("run-start", None, self.wall(), {}))

    def wall(self) -> float:
        return self.rank.real + self.rank.offset

    def up(self) -> bool:
        return not any(a <= self.rank.real < b for a, b in self.down)

    def step(self, s: int, seconds: float, hidden: float = 0.0, drop: bool = False) -> None:
        self.rank.real += seconds + hidden
        self.claims[s] = seconds
        if not drop:
            self.put(("step", s, self.wall(), {"step_time": seconds}))

    def put(self, item: tuple[str, int | None, float, dict[str, Any]]) -> None:
        if self.holding:
            self.held.append(item)
        elif not self.up():
            self.queue.append(item)
        else:
            self.flush()
            self.store(item, self.rank.real + self.rnd.uniform(0.001, CLOCK_SLACK_S / 4))

    def store(self, item: tuple[str, int | None, float, dict[str, Any]], server: float) -> None:
        kind, step, wall, payload = item
        self.rank.add(kind, step, wall, server, payload)

    def flush(self) -> None:
        if not self.queue:
            return
        for i, item in enumerate(self.queue):
            self.store(item, self.rank.real + 0.001 * (i + 1))
        payload = {"first": self.queue[0][2], "last": self.queue[-1][2],
                   "written_late": len(self.queue)}  # fmt: skip
        self.store((OUTAGE_KIND, None, self.wall(), payload),
                   self.rank.real + 0.001 * (len(self.queue) + 1))  # fmt: skip
        self.queue = []

    def release(self) -> None:
        """The saboteur writes what it held, in one burst, now."""
        self.holding = False
        for i, item in enumerate(self.held):
            self.store(item, self.rank.real + 0.001 * (i + 1))
        self.held = []

    def close(self) -> None:
        self.release()
        while not self.up():  # closing waits for the server (ledger/outage.py _drain)
            self.rank.real += 1.0
        self.flush()
        self.put(("run-end", None, self.wall(), {"steps": len(self.claims)}))


def _clock_of(records: list[Record]) -> ServerClock:
    check = ServerClock()
    for record in records:
        check.feed(record)
    return check


def _outages(rnd: random.Random, steps: int) -> list[tuple[float, float]]:
    down, at = [], 1000.0
    for _ in range(rnd.randint(0, 3)):
        at += rnd.uniform(5, steps / 2)
        length = rnd.uniform(1, 120)
        down.append((at, at + length))
        at += length
    return down


def test_honest_ranks_with_server_outages_are_silent_and_the_excuse_is_said() -> None:
    """Generative: honest ranks (random step times, store delays, 0-3 server outages of up
    to two minutes, anywhere, also at the end): no finding; every late burst is a note."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    for trial in range(30):
        steps = rnd.randint(20, 150)
        sim = _Sim(rnd, _outages(rnd, steps))
        for s in range(steps):
            sim.step(s, rnd.uniform(0.001, 2.0))
        sim.close()
        check = _clock_of(sim.rank.records)
        assert check.judge(final=True) == [], (trial, sim.down)
        bursts = sum(r.kind == OUTAGE_KIND for r in sim.rank.records)
        assert len(check.notes()) == bursts, (trial, check.notes())


def test_hiding_time_is_named_whatever_the_records_do() -> None:
    """Generative, the class "time hidden, then the records arranged to hide it": a hidden
    sleep past the slack (in one step or spread) on a rank whose records go out live, are
    held back over a stretch around the sleep and written in a burst (also from the
    run-start record on, or to the run's end), have step records dropped, or come with a
    ledger-outage record the process wrote itself.  Never silent; high wherever the server's
    times allow it (see the asserts), and a dropped record is itself high."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    for trial in range(40):
        steps = rnd.randint(30, 120)
        how = rnd.choice(["live", "hold", "hold-all", "hold-from-start", "drop", "forge"])
        k = rnd.randrange(1, steps - 1)
        hidden = CLOCK_SLACK_S * rnd.uniform(1.3, 3)
        a, b = rnd.randint(0, k), rnd.randint(k, steps - 1)
        if how == "hold-all":
            a, b = 0, steps - 1
        sim = _Sim(rnd, [], hold_start=how in ("hold-all", "hold-from-start"))
        dropped = set(rnd.sample(range(steps), rnd.randint(1, 3))) if how == "drop" else set()
        for s in range(steps):
            sim.holding = sim.holding or (how == "hold" and s == a)
            sim.step(s, rnd.uniform(0.01, 1.0), hidden if s == k else 0.0, s in dropped)
            if how.startswith("hold") and s == b:
                sim.release()
        if how == "forge":  # a ledger-outage record over steps a.. (the records went out live)
            late = [r for r in sim.rank.records if r.kind == "step" and r.step >= a]
            payload = {"first": late[0].time, "last": late[-1].time, "written_late": len(late)}
            sim.store((OUTAGE_KIND, None, sim.wall(), payload), sim.rank.real + 0.01)
        sim.close()
        check = _clock_of(sim.rank.records)
        alerts = check.judge(final=True)
        context = (trial, how, k, a, b, sorted(dropped), alerts, check.notes())
        assert alerts or check.notes(), context
        high = {a[3]["compared"] for a in alerts if a[0] == "high"}
        if dropped:
            assert "step numbers" in high, context
        # A forged excuse is accepted only when the server saw a gap before the records it
        # names that their wall times fit in: the hidden time must lie in their first step
        # and the rest take under the slack plus a store delay (the documented limit, which
        # the note then says).  Anything longer is caught.
        tail = sum(sim.claims[s] for s in range(a + 1, steps)) + (hidden if k > a else 0.0)
        held = sum(sim.claims[s] for s in range(b + 1))
        if how in ("hold-all", "hold-from-start") and held <= CLOCK_SLACK_S * 1.25:
            # The run-start record held too, over claims inside the slack: the server saw
            # nothing before the burst to hold the claims to; the wall times (made before
            # they arrived) still show the time, medium (the documented limit).
            assert ("medium", "wall time") in [(a[0], a[3]["compared"]) for a in alerts], context
        elif how != "forge" or tail > CLOCK_SLACK_S * 1.25:
            assert "step_time" in high, context


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


def test_a_real_outage_is_excused_and_said_and_time_hidden_after_it_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the real server, through a proxy that drops every connection for longer than the
    slack (tests/test_ledger_outage.py): honest step records queued during it and written
    in a burst after are excused, as a note, not a finding; a sleep hidden after the outage
    is still named (D is not reset by it); the same run with an outage record the process
    wrote itself over live records is refused (medium) and changes nothing."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.test_ledger_outage import Proxy
    from tests.test_ledger_support import postgres_schema
    from trainguard.ledger import outage as outage_mod
    from trainguard.ledger.postgres_store import PostgresLedger

    monkeypatch.setattr(outage_mod, "RETRY_SECONDS", 0.0)
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    hide_at = rnd.randint(14, 18)
    print(f"seed {seed}: hidden sleep at step {hide_at}")
    with postgres_schema() as url:
        parts = urlsplit(url)
        proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        ledger = PostgresLedger(urlunsplit(parts._replace(netloc=netloc)) + "&connect_timeout=2")
        found = {}
        try:
            for run, hide, cut in (("honest", 0, 1), ("hiding", 1, 1), ("forged", 1, 0)):
                ledger.append(run, "run-start", {}, stream=0)
                last, began = time.perf_counter(), time.time()
                for s in range(20):
                    if s == 4 and cut:
                        proxy.cut()
                    time.sleep(0.01 + CLOCK_SLACK_S * 1.5 / 8 * (4 <= s < 12))
                    if s == 12 and cut:
                        proxy.resume()
                    if hide and s == hide_at:
                        time.sleep(CLOCK_SLACK_S * 1.4)
                        last += CLOCK_SLACK_S * 1.4  # the saboteur's clock does not see it
                    now = time.perf_counter()
                    ledger.append(run, "step", {"step_time": now - last}, step=s, stream=0)
                    last = now
                if not cut:  # the process claims its records were written late
                    late = {"first": began, "last": time.time(), "written_late": 20}
                    ledger.append(run, OUTAGE_KIND, late, stream=0)
                ledger.append(run, "run-end", {}, stream=0)
                check = _clock_of(list(ledger.records(run)))
                found[run] = ([(a[0], a[3]["compared"]) for a in check.judge(final=True)],
                              check.notes())  # fmt: skip
        finally:
            ledger.close()
            if proxy.listener is not None:
                proxy.cut()
    alerts, notes = found["honest"]
    assert alerts == [] and len(notes) == 1 and "written late" in notes[0], found
    alerts, notes = found["hiding"]
    assert ("high", "step_time") in alerts and len(notes) == 1, found
    alerts, notes = found["forged"]
    assert {("high", "step_time"), ("medium", "outage")} <= set(alerts) and notes == [], found


def test_a_claim_that_is_no_duration_does_not_switch_the_check_off() -> None:
    """Generative: a step record claims NaN, an infinity or a negative duration (the guard's
    monotonic clock gives none of them); it counts as 0, so D never turns NaN: a sleep
    hidden anywhere later is still named."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    for trial in range(20):
        rank, steps = _Rank(0, rnd, rnd.uniform(-5, 5)), rnd.randint(10, 60)
        bad, hide = rnd.randrange(steps - 1), rnd.randrange(steps)
        rank.add("run-start", None, rank.real + rank.offset, rank.real + 0.001)
        for s in range(steps):
            rank.step(s, rnd.uniform(0.01, 0.5), CLOCK_SLACK_S * 1.5 if s == hide else 0.0)
            if s == bad:
                r = rank.records[-1]
                claim = rnd.choice([float("nan"), float("inf"), float("-inf"), -5.0, -1e300])
                rank.records[-1] = _record(0, r.seq, "step", s, r.time, r.server_time or 0.0,
                                           {"step_time": claim})  # fmt: skip
        alerts = _judge([rank])
        assert ("high", "step_time") in [(a[0], a[3]["compared"]) for a in alerts], (
            trial, bad, hide, alerts)  # fmt: skip
