"""Issue 12, red team family seeds_1: a data loader's private generator advanced (not
re-seeded) mid-run, so the attacker picks the data order by the number of draws.

Generated: dataset size, batch size, drop_last, whether the sampler has its own generator,
whether the loop re-seeds it each epoch (ordinary, for resumable order), and the attack
(which draw function, how many numbers, at which step). Seed printed; rerun one with
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

DRAWS = {
    "randint": lambda g, k: torch.randint(0, 2**31, (k,), generator=g),
    "rand": lambda g, k: torch.rand(k, generator=g),
    "randperm": lambda g, k: torch.randperm(k, generator=g),
    "random_": lambda g, k: torch.empty(k, dtype=torch.int64).random_(generator=g),
}


def run(rng: random.Random, attack: tuple[str, int, int] | None) -> Any:
    n, bs = rng.randrange(40, 200), rng.choice([8, 16, 32])
    x = torch.randn(n, 4)
    y = x.sum(1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    own = rng.random() < 0.5
    reseed_each_epoch = rng.random() < 0.3
    drop_last = rng.random() < 0.5
    if own:
        sampler = torch.utils.data.RandomSampler(data, generator=gen)
        dl = torch.utils.data.DataLoader(data, batch_size=bs, sampler=sampler, drop_last=drop_last)
    else:
        dl = torch.utils.data.DataLoader(
            data, batch_size=bs, shuffle=True, generator=gen, drop_last=drop_last
        )
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = tgw.watch(model, opt, dataloader=dl, hang_seconds=None, min_stall_seconds=1.0)
    step = 0
    for epoch in range(4):
        if reseed_each_epoch:
            gen.manual_seed(1000 + epoch)
        for xb, yb in dl:
            if attack is not None and step == attack[2]:
                DRAWS[attack[0]](gen, attack[1])
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=xb)
            step += 1
    guard.close()
    print(n, bs, own, reseed_each_epoch, drop_last, attack, step)
    return guard


def test_a_private_generator_advanced_by_foreign_draws_is_high_at_its_step() -> None:
    rng = seeded()
    for _ in range(4):
        state = rng.getstate()
        honest = run(rng, None)
        assert [a for a in honest.alerts if a.severity >= Severity.HIGH] == [], honest.alerts
        draws = next(c for c in honest.checks if type(c).__name__ == "DrawCheck")
        assert draws.replayed > 0  # epoch boundaries were replayed, not skipped
        rng.setstate(state)  # the same run, attacked
        at = rng.randrange(2, 12)
        attack = (rng.choice(sorted(DRAWS)), rng.randrange(3, 1000), at)  # see DrawCheck
        rng.setstate(state)
        guard = run(rng, attack)
        found = [a.step for a in guard.alerts if a.rule == "TG1305" and a.severity >= Severity.HIGH]
        # Drawn before step `at`'s forward: seen at that step's optimizer hook.
        assert found and found[0] == at, (attack, guard.alerts)
