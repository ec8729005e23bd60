"""One rank of a replicated run with two optimizers (gloo, CPU), for
tests/test_watch_optimizers.py: every rank trains the same model on the same data.

Usage: python -m tests.multiopt_worker RANK WORLD PORT OUT ODD
ODD: a rank whose second optimizer starts with another learning rate (-1: none).
"""

from __future__ import annotations

import sys

import torch

from tests.dist_worker import join, leave
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)


def main() -> None:
    rank, world, port, out, odd = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        int(sys.argv[5]),
    )
    join(rank, world, port)
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    model = torch.nn.ModuleDict({"gen": gen, "disc": disc})
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.02 if rank == odd else 0.01, momentum=0.9)
    guard = tgw.watch(
        model, [opt_g, opt_d], hang_seconds=None, sync_every=5, min_stall_seconds=30.0
    )
    g = torch.Generator().manual_seed(7)  # the same data on every rank: replicas agree
    error = None
    try:
        for _ in range(10):
            real = torch.randn(16, 8, generator=g)
            fake = gen(torch.randn(16, 8, generator=g))
            loss_d = (disc(fake.detach()) - disc(real)).mean()
            opt_d.zero_grad()
            loss_d.backward()  # type: ignore[no-untyped-call]
            opt_d.step()
            loss_g = -disc(gen(torch.randn(16, 8, generator=g))).mean()
            opt_g.zero_grad()
            loss_g.backward()  # type: ignore[no-untyped-call]
            opt_g.step()
            guard.step(loss=loss_g)
    except Exception as exc:
        error = repr(exc)[:300]
    finally:
        leave(guard, out, error)


if __name__ == "__main__":
    main()
