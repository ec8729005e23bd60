"""Many random attack variants against protect() (tests/test_protect_variants.py at scale).

Each variant (payload x route x protocol x container, tests/protect_variants.py) is
proven to fire under the real loader, then loaded under protect() in block and warn
mode; a payload that runs, or a load that is not refused, is a miss.  Prints the
seed, the counts, and every miss (replay one with TG_VARIANT_SEED and --count).

    .venv/bin/python bench/protect_variants.py --count 2000 [--seed N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.protect_variants import random_variants
from tests.test_protect_variants import run_variants

BATCH = 200  # one subprocess per batch and mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args()
    print(f"seed {args.seed}, {args.count} variants", flush=True)
    variants = random_variants(random.Random(args.seed), args.count)
    counts = {"not firing unguarded": 0, "fired under protect": 0, "not refused": 0}
    misses: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for at in range(0, len(variants), BATCH):
            batch = variants[at : at + BATCH]
            # Random draws repeat; a batch loads each distinct variant once.
            batch = list(dict.fromkeys(batch))
            folder = Path(tmp) / str(at)
            real = run_variants(batch, folder, "real")
            counts["not firing unguarded"] += sum(not fired for _, fired in real.values())
            for mode in ("block", "warn"):
                for name, (status, fired) in run_variants(batch, folder, mode).items():
                    if fired or status != "refused":
                        counts["fired under protect" if fired else "not refused"] += 1
                        misses.append(f"{mode} {name}: {status}{' (fired)' if fired else ''}")
                        print("MISS", misses[-1], flush=True)
            elapsed = time.perf_counter() - start
            print(f"  {at + len(batch)} done, {elapsed:.0f} s, {counts}", flush=True)
    for key, value in counts.items():
        print(f"{key}: {value}")
    return 1 if misses or counts["not firing unguarded"] else 0


if __name__ == "__main__":
    sys.exit(main())
