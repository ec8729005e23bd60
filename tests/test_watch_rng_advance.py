"""Red team classes A and F (2026-12-04, /work/tmp/redteam_watch: rng_setstate.py
VARIANT=forge/advance, dataloader_swap.py VARIANT=order/gen).

* torch's global generator set to a foreign state whose initial-seed field was kept:
  no seeding call, the same initial seed, a state never seen.  A generator only moves
  forward, so the state at each step must be the previous one advanced by some draws.
* extra draws chosen by an attacker each step ("mask grinding"): medium when the
  honest count was steady.
* an object on the data loader's path replaced (``dl.batch_sampler.sampler``,
  ``dl.sampler.generator``, ``collate_fn``...): the loader reads it, the guard held
  the one from start-up.

Generated: draw counts and starting positions for the search itself; the model's
dropout, checkpointing, fork_rng and declared re-seeds for honest runs; the forged
state, the step and the path for attacks.  Seed printed; rerun one with
TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402
from trainguard.monitor import mt19937  # noqa: E402


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


# -- the search ---------------------------------------------------------------------------------
DRAWS = {
    "rand": lambda g, k: torch.rand(k, generator=g),  # one 32-bit draw per float
    "random_int32": lambda g, k: torch.empty(k, dtype=torch.int32).random_(generator=g),
    "randn": lambda g, k: torch.randn(k, generator=g),
    "randperm": lambda g, k: torch.randperm(k + 1, generator=g),
    "bernoulli": lambda g, k: torch.bernoulli(torch.full((k,), 0.5), generator=g),
}


def test_advance_counts_the_draws_between_two_states_and_rejects_foreign_ones() -> None:
    rng = seeded()
    for _ in range(40):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        if rng.random() < 0.7:  # start anywhere in a block, at its end, or just seeded
            torch.rand(rng.choice([1, 623, 624, rng.randrange(1, 5000)]), generator=g)
        before = g.get_state()
        how = rng.choice(sorted(DRAWS))
        k = rng.choice([0, 1, 2, 623, 624, 625, rng.randrange(1, 20000)])
        if k:
            DRAWS[how](g, k)
        after = g.get_state()
        found = mt19937.advance(before, after, 1 << 20)
        assert found is not None, (how, k)
        if how in ("rand", "random_int32"):
            assert found == k, (how, k, found)
        # The same position in a foreign stream: the seed field copied, as the red team did.
        foreign = torch.Generator().manual_seed(rng.randrange(2**31))
        torch.rand(rng.randrange(1, 3000), generator=foreign)
        forged = foreign.get_state()
        forged[:8] = before[:8]
        assert mt19937.advance(before, forged, 1 << 20) is None
        # Going back is not advancing.
        if found:
            assert mt19937.advance(after, before, 1 << 20) is None
    # Beyond the bound: not found, and the bound is honoured to the draw.
    g = torch.Generator().manual_seed(1)
    a = g.get_state()
    torch.rand(5000, generator=g)
    assert mt19937.advance(a, g.get_state(), 4999) is None
    assert mt19937.advance(a, g.get_state(), 5000) == 5000


# -- a training loop ------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self, checkpoint: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 2)
        self.drop = torch.nn.Dropout(0.3)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.checkpoint:  # re-runs dropout in backward with the saved random state
            h = torch.utils.checkpoint.checkpoint(self.drop, h, use_reentrant=False)
        else:
            h = self.drop(h)
        return self.fc2(h)


def train(rng: random.Random, attack: Any = None, steps: int = 12) -> Any:
    torch.manual_seed(rng.randrange(2**31))
    net = Net(checkpoint=rng.random() < 0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    budget = rng.choice([None, None, 0.05])
    kw: dict[str, Any] = {"ledger": None, "hang_seconds": None, "min_stall_seconds": 5.0}
    if budget is not None:
        kw["budget"] = budget
    guard = tgw.watch(net, opt, **kw)
    reseed_at = rng.randrange(3, steps) if rng.random() < 0.3 else -1
    fork_every = rng.choice([0, 2])
    for step in range(steps):
        reseed = step == reseed_at
        if reseed:
            torch.manual_seed(1000 + step)  # declared below
        if fork_every and step % fork_every == 0:
            with torch.random.fork_rng():  # honest: draws inside are undone
                torch.rand(rng.randrange(1, 3000))
        x = torch.randn(16, 8)
        loss = torch.nn.functional.cross_entropy(net(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, reseed=reseed)
        if attack is not None:
            attack(step)
    guard.close()
    print(budget, net.checkpoint, reseed_at, fork_every)
    return guard


def test_python_and_numpy_global_generators_may_only_advance_too() -> None:
    import random as pyrandom

    np = pytest.importorskip("numpy")
    rng = seeded()
    for _ in range(20):
        r = pyrandom.Random(rng.randrange(2**31))
        r.getrandbits(32 * rng.randrange(0, 2000) + 32)
        a = r.getstate()
        k = rng.choice([0, 1, 623, 624, 625, rng.randrange(1, 20000)])
        if k:
            r.getrandbits(32 * k)
        assert mt19937.python_advance(a, r.getstate(), 1 << 20) == k
        other = pyrandom.Random(rng.randrange(2**31))
        other.random()
        assert mt19937.python_advance(a, other.getstate(), 1 << 20) is None
        s = np.random.RandomState(rng.randrange(2**31))
        s.random_sample(rng.randrange(0, 2000))
        b = s.get_state()
        s.random_sample(k)  # two 32-bit draws per double
        assert mt19937.numpy_advance(b, s.get_state(), 1 << 20) == 2 * k
        t = np.random.RandomState(rng.randrange(2**31))
        t.random_sample(3)
        assert mt19937.numpy_advance(b, t.get_state(), 1 << 20) is None
    # In a watched run: random.setstate to a foreign state is high at the next step.
    forged = pyrandom.Random(rng.randrange(2**31))
    forged.random()

    def forge(step: int) -> None:
        if step == 5:
            pyrandom.setstate(forged.getstate())

    guard = train(random.Random(rng.random()), forge)
    found = [a for a in guard.alerts if a.rule == "TG1305" and "python" in a.message]
    assert found and found[0].severity == Severity.HIGH, guard.alerts


def test_a_foreign_generator_state_is_high_and_honest_randomness_is_not() -> None:
    rng = seeded()
    for _ in range(3):
        state = rng.getstate()
        honest = train(rng)
        assert high(honest) == [], honest.alerts
        rng.setstate(state)
        at = random.Random(rng.random()).randrange(4, 10)
        foreign_seed = rng.randrange(2**31)
        rng.setstate(state)

        def forge(step: int, at: int = at, seed: int = foreign_seed) -> None:
            if step >= at:
                g = torch.Generator().manual_seed(seed + step)
                torch.rand(seed % 700, generator=g)  # anywhere in its stream
                forged = g.get_state()
                forged[:8] = torch.default_generator.get_state()[:8]  # the same initial seed
                torch.default_generator.set_state(forged)

        guard = train(rng, forge)
        found = [a for a in guard.alerts if a.rule == "TG1305" and a.severity >= Severity.HIGH]
        assert found, guard.alerts
        # Exact mode sees it at once; budget mode at a step its schedule draws.
        assert found[0].step >= at + 1
        assert "cannot reach by drawing" in found[0].message


def test_extra_draws_that_vary_each_step_are_medium_and_an_epochs_draws_are_not() -> None:
    rng = seeded()
    at = rng.randrange(5, 8)

    def grind(step: int) -> None:
        if step >= at:
            torch.rand(1 + rng.randrange(200))

    guard = train(random.Random(rng.random()), grind, steps=at + 8)
    counts = [a for a in guard.alerts if a.rule == "TG1305" and "varies" in a.message]
    assert counts and counts[0].severity == Severity.MEDIUM, guard.alerts
    assert counts[0].step >= at + 4  # VARYING other counts first
    # Once, an other count (an epoch boundary's seeds): nothing.
    once = rng.randrange(5, 12)
    guard = train(random.Random(rng.random()), lambda s: torch.rand(4) if s == once else None)
    assert [a for a in guard.alerts if "varies" in a.message] == [], guard.alerts


# -- the data loader's path -------------------------------------------------------------------
PATHS = {
    "batch_sampler.sampler": lambda dl, n: setattr(dl.batch_sampler, "sampler", list(range(n))),
    "sampler.generator": lambda dl, n: setattr(
        dl.sampler, "generator", torch.Generator().manual_seed(42)
    ),
    "collate_fn": lambda dl, n: dl.__dict__.__setitem__("collate_fn", _wrapped(dl.collate_fn)),
    "dataset": lambda dl, n: dl.__dict__.__setitem__(
        "dataset", torch.utils.data.TensorDataset(torch.zeros(n, 4), torch.zeros(n, 1))
    ),
}


def _wrapped(collate: Any) -> Any:
    return lambda b: collate(b)


def run_loader(rng: random.Random, swap: str | None, declare: bool) -> Any:
    n = rng.randrange(40, 120)
    x = torch.randn(n, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    sampler = torch.utils.data.RandomSampler(data, generator=gen)
    dl = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = tgw.watch(
        model,
        opt,
        dataloader=dl,
        data_check=rng.random() < 0.5,
        hang_seconds=None,
        min_stall_seconds=5.0,
        ledger=None,
    )
    swap_epoch = rng.randrange(1, 3)
    step = 0
    for epoch in range(3):
        gen.manual_seed(100 + epoch)  # re-seeded each epoch: resumable order, not a swap
        changed = None
        if swap is not None and epoch == swap_epoch:
            PATHS[swap](dl, n)
            changed = [f"dataloader.{swap}"] if declare else None
        for i, (xb, yb) in enumerate(dl):
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=(xb, yb), changed=changed if i == 0 else None)
            step += 1
    guard.close()
    return guard, swap_epoch


def test_an_object_swapped_on_the_loaders_path_is_named_unless_declared() -> None:
    rng = seeded()
    for _ in range(3):
        swap = rng.choice(sorted(PATHS))
        state = rng.getstate()
        honest, _ = run_loader(rng, None, False)
        assert high(honest) == [], honest.alerts
        rng.setstate(state)
        guard, _ = run_loader(rng, swap, False)
        found = [a for a in guard.alerts if a.rule == "TG1319"]
        assert found and f"dataloader.{swap}" in found[0].message, (swap, guard.alerts)
        rng.setstate(state)
        quiet, _ = run_loader(rng, swap, True)
        assert [a for a in quiet.alerts if a.rule == "TG1319"] == [], (swap, quiet.alerts)


def test_on_a_budget_a_one_off_foreign_state_is_high_at_its_step_when_drawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Budget mode: the unit's first boundary is taken at the step before a drawn step
    (the schedule's next draw is known there), not at every skipped step.  A foreign
    state set once after the warm-up is high at the next step when the schedule drew
    it, an honest run stays below high, and the unit skips steps."""
    import trainguard.monitor.budget as budget

    rng = seeded()
    monkeypatch.setattr(budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, 0.5), 0))
    steps = budget.WARMUP_STEPS + 16
    for forge in (False, True, True, True):
        torch.manual_seed(rng.randrange(2**31))
        net = Net(checkpoint=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        guard = tgw.watch(net, opt, ledger=None, hang_seconds=None, budget=0.05)
        at = rng.randrange(budget.WARMUP_STEPS, steps - 2)
        for step in range(steps):
            x = torch.randn(16, 8)
            loss = torch.nn.functional.cross_entropy(net(x), (x[:, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss)
            if forge and step == at:
                g = torch.Generator().manual_seed(rng.randrange(2**31))
                torch.rand(rng.randrange(1, 700), generator=g)
                forged = g.get_state()
                forged[:8] = torch.default_generator.get_state()[:8]
                torch.default_generator.set_state(forged)
        guard.close()
        assert guard.schedule is not None
        drawn = set(guard.schedule.recent["rng_advance"])
        high = [a.step for a in guard.alerts if a.rule == "TG1305" and a.severity >= Severity.HIGH]
        print(forge, at, sorted(drawn), high)
        assert len([s for s in drawn if budget.WARMUP_STEPS <= s < steps]) < steps - 16
        if not forge:
            assert high == [], guard.alerts
        elif at + 1 in drawn:
            assert at + 1 in high, guard.alerts
