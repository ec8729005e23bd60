"""The seed of a generated test: fresh each run, printed, and replayed with
``TRAINGUARD_TEST_SEED=<seed>``."""

from __future__ import annotations

import os
import random


def seeded() -> random.Random:
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    return random.Random(seed)
