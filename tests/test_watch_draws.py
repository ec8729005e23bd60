"""Issue 12, red team family seeds_1: a data loader's private generator advanced (not
re-seeded) mid-run, so the attacker picks the data order by the number of draws; red team 4
A13a: the generator re-seeded mid-epoch to a seed ground for a class-skewed order.

Generated: dataset size, batch size, drop_last, the sampler (the loader's shuffle, a
RandomSampler with its own generator, a SequentialSampler with the loader's generator, a
WeightedRandomSampler whose draws are not replayed), persistent workers, how the loop seeds
each epoch (not at all, base + epoch undeclared, any seed declared), and the attack (foreign
draws: which function, how many numbers; or a re-seed to a fresh seed; at which step). Seed
printed; rerun one with TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402

DRAWS = {
    "randint": lambda g, k: torch.randint(0, 2**31, (k,), generator=g),
    "rand": lambda g, k: torch.rand(k, generator=g),
    "randperm": lambda g, k: torch.randperm(k, generator=g),
    "random_": lambda g, k: torch.empty(k, dtype=torch.int64).random_(generator=g),
}


SAMPLERS = ("shuffle", "own", "sequential", "weighted")
REPLAYED = ("shuffle", "own", "sequential")  # whose draws DrawCheck replays


def run(rng: random.Random, attack: tuple[str, int, int] | None) -> tuple[Any, int]:
    """The guard, and the step the attack was made at (the first at or after the one asked
    that declares no re-seed: a declared step's re-seed is the loop's)."""
    n, bs = rng.randrange(40, 200), rng.choice([8, 16, 32])
    x = torch.randn(n, 4)
    y = x.sum(1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    kind = rng.choice(SAMPLERS)
    seeding = rng.choice(["none", "epoch", "declared"])
    drop_last = rng.random() < 0.5
    workers = {"num_workers": 1, "persistent_workers": True} if rng.random() < 0.15 else {}
    sampler: Any = None
    if kind == "own":
        sampler = torch.utils.data.RandomSampler(data, generator=gen)
    elif kind == "weighted":
        sampler = torch.utils.data.WeightedRandomSampler(torch.rand(n) + 0.1, n, generator=gen)
    if sampler is not None:
        dl = torch.utils.data.DataLoader(
            data, batch_size=bs, sampler=sampler, drop_last=drop_last, **workers
        )
    else:
        dl = torch.utils.data.DataLoader(
            data, batch_size=bs, shuffle=kind == "shuffle", generator=gen, drop_last=drop_last,
            **workers,
        )  # fmt: skip
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = tgw.watch(model, opt, dataloader=dl, hang_seconds=None, min_stall_seconds=1.0)
    step = 0
    base = rng.randrange(2**31)
    epoch = 0
    done = -1
    while epoch < 4 or (attack is not None and done < 0):  # the attack's step is run
        declare = False
        if seeding == "epoch":
            gen.manual_seed(1000 + epoch)  # the resumable order of docs/replay.md
        elif seeding == "declared":
            gen.manual_seed(rng.randrange(2**31))
            declare = True
        for xb, yb in dl:
            if attack is not None and step >= attack[2] and done < 0 and not declare:
                done = step
                if attack[0] == "reseed":
                    gen.manual_seed(base + 7)  # a chosen seed, not the epoch's next one
                else:
                    DRAWS[attack[0]](gen, attack[1])
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=xb, reseed=declare)
            declare = False
            step += 1
        epoch += 1
    guard.close()
    print(n, bs, kind, seeding, bool(workers), drop_last, attack, done, step)
    return guard, done


def test_a_private_generator_moved_by_foreign_draws_or_a_reseed_is_high_at_its_step() -> None:
    rng = seeded()
    for _ in range(4):
        state = rng.getstate()
        honest, _ = run(rng, None)
        assert [a for a in honest.alerts if a.severity >= Severity.HIGH] == [], honest.alerts
        draws = next(c for c in honest.checks if type(c).__name__ == "DrawCheck")
        rng.setstate(state)
        rng.randrange(40, 200), rng.choice([8, 16, 32]), rng.randrange(2**31)
        kind = rng.choice(SAMPLERS)
        if kind in REPLAYED:
            assert draws.replayed > 0  # epoch boundaries were replayed, not skipped
        at = rng.randrange(2, 12)
        # Foreign draws are judged only where the loader's draws are replayed (see DrawCheck);
        # a re-seed everywhere.  At least 8 numbers: fewer can equal a base seed's draw.
        how = rng.choice([*sorted(DRAWS), "reseed"]) if kind in REPLAYED else "reseed"
        attack = (how, rng.randrange(8, 1000), at)
        rng.setstate(state)
        guard, at = run(rng, attack)
        found = [a.step for a in guard.alerts if a.rule == "TG1305" and a.severity >= Severity.HIGH]
        # Made before step `at`'s forward: seen at that step's optimizer hook.
        assert found and found[0] == at, (attack, guard.alerts)
