"""A dead rank from a rank blocked behind it (distributed.check_ranks, TG1311 / TG1314).

Real guards of one run in one process, on one ledger, each with its own rank: a judge
whose training failed (it closes with the error), dead ranks (they stop writing, some
after a note of waiting that goes stale) and blocked ranks, whose training thread
waits inside torch.distributed (an elastic store barrier that the test releases at the
end) while their watchdog writes its notes.  The judge must name every dead rank
stopped and only them, and every blocked rank blocked, with where it waits.  The mix
is drawn from a fresh seed each run (printed); tests/test_fsdp.py does the same with
real collectives at 8 ranks, where which survivors block depends on gloo.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.distributed import HashStore  # noqa: E402
from torch.distributed.elastic.utils.store import barrier  # noqa: E402

from trainguard.monitor import distributed, watchdog  # noqa: E402
from trainguard.monitor.guard import Guard, watch  # noqa: E402


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The production intervals (15 s grace, notes every 4 s) scaled down together.
    monkeypatch.setattr(distributed, "FAILED_GRACE_SECONDS", 4.0)
    monkeypatch.setattr(distributed, "NOTE_FRESH_SECONDS", 2.5)
    monkeypatch.setattr(watchdog, "WAIT_NOTE_SECONDS", 0.3)
    monkeypatch.setattr(watchdog, "WAIT_NOTE_EVERY", 0.5)
    yield


def _guard(ledger: Path, rank: int, world: int) -> tuple[Guard, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(
        model, opt, ledger=str(ledger), run_id="r", rank=rank, world_size=world, hang_seconds=60
    )
    return guard, model, opt


def _step(guard: Guard, model: Any, opt: Any) -> None:
    x = torch.randn(3, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    guard.step(loss=loss)


def test_dead_ranks_are_stopped_and_blocked_ranks_blocked(
    tmp_path: Path, short_waits: None
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    world = rng.randrange(3, 6)
    roles = ["dead"] + [rng.choice(["dead", "stale", "blocked"]) for _ in range(world - 2)]
    rng.shuffle(roles)
    roles.insert(rng.randrange(world), "judge")
    print(f"seed {seed}: {roles}")
    ledger, store = tmp_path / "ledger.sqlite", HashStore()
    guards: dict[int, Guard] = {}
    waiting = []

    def blocked(rank: int, ready: threading.Event) -> None:
        guard, model, opt = _guard(ledger, rank, world)
        guards[rank] = guard
        _step(guard, model, opt)
        ready.set()
        barrier(store, 2, f"rank{rank}", barrier_timeout=60)  # waits until the test releases it

    for rank, role in enumerate(roles):
        if role == "blocked":
            ready = threading.Event()
            thread = threading.Thread(target=blocked, args=(rank, ready), daemon=True)
            thread.start()
            assert ready.wait(60)
            waiting.append((rank, thread))
        elif role != "judge":
            guard, model, opt = _guard(ledger, rank, world)
            guards[rank] = guard
            _step(guard, model, opt)
            if role == "stale":  # waited in a collective once, then died: proves nothing now
                guard._record(watchdog.WAITING_KIND, {"collective": "all_gather", "last_step": 0})
            guard.watchdog.stop()  # type: ignore[union-attr]  # dead: nothing more from it
    me = roles.index("judge")
    judge, model, opt = _guard(ledger, me, world)
    _step(judge, model, opt)
    try:
        judge.close(RuntimeError("a peer died"))
    finally:
        for rank, thread in waiting:
            barrier(store, 2, f"rank{rank}", barrier_timeout=60)
            thread.join(60)
    stopped = {a.evidence["stopped_rank"] for a in judge.alerts if a.rule == "TG1311"}
    named_blocked = {
        a.evidence["blocked_rank"]: a.evidence for a in judge.alerts if a.rule == "TG1314"
    }
    assert stopped == {r for r, role in enumerate(roles) if role in ("dead", "stale")}, seed
    assert set(named_blocked) == {r for r, _ in waiting}, (seed, named_blocked)
    for evidence in named_blocked.values():
        assert evidence["collective"] == "barrier", evidence  # where its watchdog saw it wait
        assert evidence["behind"] == sorted(stopped), evidence
    for guard in guards.values():  # never closed: a closing peer would wait for the others
        if guard.watchdog is not None:
            guard.watchdog.stop()


def test_a_run_closed_before_its_first_step_names_nobody(tmp_path: Path, short_waits: None) -> None:
    # Every rank's clean close waits for peers behind it; with no step taken nobody is
    # behind.  (Each rank once waited for the others' run-end, which they write only
    # after their own wait, and named them all "stopped before step 0".)
    world = random.randrange(2, 5)
    guards = [_guard(tmp_path / "ledger.sqlite", rank, world)[0] for rank in range(world)]
    for guard in guards:
        guard.close()
    found = [(g.rank, a.rule) for g in guards for a in g.alerts if a.rule in ("TG1311", "TG1314")]
    assert found == [], found
