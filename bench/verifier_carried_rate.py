"""What a sampling rate below 1 costs against sabotage carried in checkpoint state.

A checkpoint is held to what recomputing the segment before it ends in; where that
segment was not drawn, only to what the ledger says of it.  This trains the small run of
tests/verifier_train.py (a checkpoint every 5 steps) with torch's generator re-seeded
right before the save at step CUT (after the last step of its segment, so no step of
that segment shows it), recomputes each of the two segments around CUT alone (as a
verifier that drew only that one does), and then counts, over many verifier secrets,
how often a rate-p verifier draws a segment that names it.

    .venv/bin/python bench/verifier_carried_rate.py [CUT] [SECRETS]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tests import verifier_train as vt

import trainguard
from trainguard.explain.replay.engine import epochs_from
from trainguard.explain.verifier.follow import Verifier
from trainguard.explain.verifier.sampling import chosen, secret_from
from trainguard.signing.keys import write_keypair

CUT = int(sys.argv[1]) if len(sys.argv) > 1 else 10
SECRETS = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
STEPS, EVERY = 20, 5


def train(folder: Path) -> None:
    model, opt, sched, loader, epoch = vt.parts()
    step = vt.make_step(model, opt, sched)
    guard = trainguard.watch(
        model, opt, ledger=str(folder / "ledger.db"), run_id="r", scheduler=sched, key=vt.KEY,
        dataloader=loader, hang_seconds=None,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(STEPS + 1):
            if s == CUT:
                torch.manual_seed(99)  # carried by this checkpoint; every step matches
            if s % EVERY == 0:
                guard.checkpoint(folder / f"r-{s}.pt")
            if s < STEPS:
                guard.step(loss=step(next(batches)), batch=None)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train(folder)
        private, _ = write_keypair(folder / "verifier")
        verifier = Verifier(
            str(folder / "ledger.db"), "r", vt.build, signing_key=str(private),
            secret=secret_from(private.read_bytes()), rate=1.0, run_key=vt.KEY,
            checkpoint_dir=str(folder),
        )  # fmt: skip
        try:
            verifier.poll()  # reads the run (recomputes every segment: rate 1)
            names = {}
            for a in (CUT - EVERY, CUT):
                v = verifier._verify(a, a + EVERY, 1)
                names[a] = v.status != "matched"
                print(f"segment {a}..{a + EVERY - 1} alone: {v.status} {v.step} {v.cause[:120]}")
        finally:
            verifier.close()
    catching = [a for a, caught in names.items() if caught]
    print(f"segments that name the re-seed at checkpoint {CUT}: {catching}")
    for p in (0.02, 0.05, 0.1, 0.2, 0.5):
        hits = 0
        for _ in range(SECRETS):
            secret = os.urandom(32)
            hits += any(chosen(secret, "r", a, p) for a in catching)
        print(f"rate {p}: detected with probability {hits / SECRETS:.3f} "
              f"(both sides would give {1 - (1 - p) ** 2:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
