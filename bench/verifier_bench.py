"""What the verifier costs against training (docs/verifier.md).

Trains a small MLP on the CPU under ``watch`` with a checkpoint every EVERY steps (in
this process, timed), then runs a :class:`Verifier` over the finished run with rate 1
(every segment recomputed), timing its start-up (entry import, ledger open) and each
segment's recomputation.  The ratio per segment times the sampling rate p is the extra
compute of a verifier at rate p.  Run it on an otherwise idle machine:

    .venv/bin/python bench/verifier_bench.py [STEPS] [EVERY] [WIDTH]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import trainguard
from trainguard.explain.replay.engine import Replayable, ReplayContext, epochs_from

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
EVERY = int(sys.argv[2]) if len(sys.argv) > 2 else 20
WIDTH = int(sys.argv[3]) if len(sys.argv) > 3 else 512
KEY = bytes(range(32))


def parts() -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=g)
    y = x[:, :1]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator(),
    )

    def epoch(e: int) -> Any:
        loader.generator.manual_seed(e)
        return loader

    def step(batch: Any) -> Any:
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, loader, epoch, step


def build(ctx: ReplayContext) -> Replayable:
    model, opt, loader, epoch, step = parts()
    return Replayable(
        model, opt, epochs_from(ctx.start, len(loader), epoch), step, dataloader=loader
    )


def main() -> None:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    folder = Path(tempfile.mkdtemp(prefix="verifier-bench-"))
    model, opt, loader, epoch, step = parts()
    guard = trainguard.watch(
        model,
        opt,
        ledger=str(folder / "l.db"),
        run_id="b",
        key=KEY,
        dataloader=loader,
        hang_seconds=None,
    )
    guard.checkpoint(folder / "b-0.pt")
    batches = epochs_from(0, len(loader), epoch)
    t0 = time.perf_counter()
    for s in range(STEPS):
        guard.step(loss=step(next(batches)), batch=None)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"b-{s + 1}.pt")
    train_s = time.perf_counter() - t0
    guard.close()
    private, _ = write_keypair(folder / "v")
    t0 = time.perf_counter()
    verifier = Verifier(
        str(folder / "l.db"),
        "b",
        build,
        signing_key=str(private),
        secret=secret_from(private.read_bytes()),
        rate=1.0,
        run_key=KEY,
    )
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    verdicts = verifier.poll()
    verify_s = time.perf_counter() - t0
    # A poll that finds nothing new: what following a run costs between checkpoints
    # (each poll reads only the records after the last one read, per stream).
    t0 = time.perf_counter()
    for _ in range(20):
        verifier.poll()
    idle_poll_s = (time.perf_counter() - t0) / 20
    # What each recomputation did before replaying until the verifier kept its own history
    # (and each rank of a data-parallel one still does): verify and read the whole run.
    from trainguard.explain.replay.ledger import read_history
    from trainguard.ledger import verify_ledger

    t0 = time.perf_counter()
    verify_ledger(verifier.store, "b")
    read_history(verifier.store, "b", 0)
    reread_s = time.perf_counter() - t0
    records = sum(1 for _ in verifier.store.records("b"))
    verifier.close()
    segs = len(verdicts)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params:,} parameters, {STEPS} steps, checkpoint every {EVERY}, {segs} segments")
    print(
        f"training (guard and checkpoints included): {train_s:.2f} s, "
        f"{train_s / segs:.3f} s per segment"
    )
    print(f"verifier start-up: {start_s:.2f} s (once)")
    print(
        f"verifier, every segment: {verify_s:.2f} s, {verify_s / segs:.3f} s per segment, "
        f"{verify_s / train_s:.2f}x training"
    )
    print(f"a poll with nothing new: {idle_poll_s * 1e3:.1f} ms")
    print(
        f"verifying and reading the run's {records} records (no longer per recomputation): "
        f"{reread_s * 1e3:.0f} ms ({reread_s / records * 1e6:.0f} us per record)"
    )
    print("statuses:", sorted({v.status for v in verdicts}))
    for p in (0.02, 0.05, 0.1):
        print(f"rate {p}: about {p * verify_s / train_s:.1%} extra compute")


if __name__ == "__main__":
    main()
