"""A sweep of honest runs over the combinations users run: all must replay as matched.

Each case (tests/honest_runs.py) trains a tiny model for 6-8 steps in one combination of
optimizer (SGD, Adam, AdamW), scheduler or none, ``watch`` exact or ``budget=0.02``, a
checkpoint every 2 or 3 steps, gradient accumulation or not, clipping or not, the data
order from the loader's own generator or a ``DistributedSampler``, and an evaluation
under ``torch.random.fork_rng()`` before each save or none; then replays it in segment
mode and runs verify-run on it with every segment drawn.  Any case not matched, or with
an alert, is a false alarm: printed with its combination and the seed that draws it.
tests/test_verifier_honest.py draws one case per CI run.

    .venv/bin/python bench/honest_matrix.py [CASES] [SEED]
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tests import honest_runs

CASES = int(sys.argv[1]) if len(sys.argv) > 1 else 24
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else random.SystemRandom().randrange(2**32)


def main() -> int:
    torch.set_num_threads(1)
    print(f"seed {SEED}, {CASES} cases", flush=True)
    rnd = random.Random(SEED)
    bad = 0
    for i in range(CASES):
        combo = honest_runs.draw(rnd)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            found = honest_runs.judge(combo, Path(tmp))
        took = time.perf_counter() - began
        print(f"case {i}: {'FALSE ALARM' if found else 'matched'} ({took:.1f} s)", flush=True)
        for line in found:
            print(f"    {line}", flush=True)
        bad += bool(found)
    print(f"{bad} of {CASES} honest cases not matched", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
