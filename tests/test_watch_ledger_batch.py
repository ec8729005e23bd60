"""Batched step records (monitor/recorder.py): held in memory, written in one transaction.

Generated (seed printed, TRAINGUARD_TEST_SEED reruns one): a ledger written with a
random mix of single appends and batches chains as one append each would, every
record keeping the wall time it was made; a budget-mode guard holds fewer than
``BATCH_RECORDS`` step records at any time, writes them before an alert, a signed
head and the run-end, and its ledger verifies.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.ledger import open_ledger  # noqa: E402
from trainguard.ledger.chain import normalise_payload  # noqa: E402
from trainguard.ledger.verify import verify_ledger  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402
from trainguard.monitor.recorder import BATCH_RECORDS  # noqa: E402


def test_batches_and_single_appends_chain_as_one_append_each(tmp_path: Any) -> None:
    rng = seeded()
    ledger = open_ledger(str(tmp_path / "l.db"))
    made: list[tuple[str, int | None, float]] = []
    step = 0
    for _ in range(rng.randrange(3, 12)):
        if rng.random() < 0.4:
            ledger.append("r", "note", {"n": step}, step=step, stream=0)
            made.append(("note", step, -1.0))
            continue
        items = []
        for _ in range(rng.randrange(0, 6)):
            when = 1.0e9 + step + rng.random()
            items.append(("step", step, when, normalise_payload({"loss": rng.random()})))
            made.append(("step", step, when))
            step += 1
        written = ledger.append_many("r", 0, items)
        assert [r.time for r in written] == [i[2] for i in items]
    records = list(ledger.records("r", 0))
    assert [r.seq for r in records] == list(range(len(made)))
    assert [(r.kind, r.step) for r in records] == [(k, s) for k, s, _ in made]
    assert all(r.time == when for r, (_, _, when) in zip(records, made, strict=True) if when > 0)
    findings = verify_ledger(ledger, "r")
    assert [f for f in findings if f.severity >= Severity.HIGH] == [], findings


def test_a_budget_guard_holds_few_step_records_and_writes_them_before_an_alert(
    tmp_path: Any,
) -> None:
    rng = seeded()
    url = str(tmp_path / "runs.db")
    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sign_every = rng.choice([7, 20, 100])
    guard = tgw.watch(model, opt, ledger=url, run_id="b", budget=0.02, sign_every=sign_every)
    assert guard.recorder.batched
    x, y = sc.make_data()
    steps = rng.randrange(40, 90)
    poke = rng.randrange(20, steps - 5)
    reader = open_ledger(url)
    for s in range(steps):
        loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
        written = [r.step for r in reader.records("b", 0) if r.kind == "step"]
        assert written == list(range(len(written)))  # in order, none lost
        assert s + 1 - len(written) < BATCH_RECORDS
        if (s + 1) % sign_every == 0:
            assert len(written) == s + 1  # the signed head names the last step
        if s == poke:
            # A seeding call: TG1305 at s + 1 (read at every step; an in-place write is
            # found only at a boundary the version counters' unit draws).
            torch.manual_seed(1234)
    guard.close()
    records = list(open_ledger(url).records("b", 0))
    alert = next(r for r in records if r.kind == "alert" and r.payload["rule"] == "TG1305")
    assert alert.step == poke + 1
    before = [r.step for r in records if r.kind == "step" and r.seq < alert.seq]
    assert before == list(range(poke + 1))  # every earlier step was written first
    assert [r.step for r in records if r.kind == "step"] == list(range(steps))
    findings = verify_ledger(open_ledger(url), "b")
    assert [f for f in findings if f.severity >= Severity.HIGH] == [], findings
