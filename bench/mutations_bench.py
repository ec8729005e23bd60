"""The mutation engine at scale: N random mutants, each scanned and each run.

    .venv/bin/python bench/mutations_bench.py [N] [SEED]

Every mutant is scanned (it must be flagged high or critical: the default
level) and loaded by its real loader in a forked child (its payload must
create its canary).  Prints the seed, the detection rate, every miss and every
mutant that did not fire (an engine bug, or a combination no loader runs).
Default N is 5,000; the run takes a few minutes on two cores.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_samples_fire import _run_all

from trainguard import Severity, scan_file
from trainguard.samples import missing_modules
from trainguard.samples.mutation_containers import draw
from trainguard.samples.mutation_tamper import HOOK_DICTS, HOOKS, REBUILDS, draw_tamper, hook_mutant

_BATCH = 250


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 5000
    seed = int(argv[1]) if len(argv) > 1 else random.SystemRandom().randrange(2**32)
    print(f"TRAINGUARD_MUTATION_SEED={seed} N={n}")
    rng = random.Random(seed)
    samples = []
    seen: set[str] = set()
    while len(samples) < n:
        k = len(samples) % 20
        if k == 19:  # 5% backward hooks
            s = hook_mutant(rng.choice(sorted(HOOKS)), rng.choice(REBUILDS), rng.choice(HOOK_DICTS))
        elif k in (9, 18):  # 10% Sleepy Pickle
            s = draw_tamper(rng)
        else:
            s = draw(rng)
        if s.id not in seen and not missing_modules(s):
            seen.add(s.id)
            samples.append(s)
    misses: list[str] = []
    silent: list[str] = []
    by_container: Counter[str] = Counter()
    t_scan = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, n, _BATCH):
            root = Path(tmp) / f"batch{start}"
            (root / "canaries").mkdir(parents=True)
            batch = samples[start : start + _BATCH]
            outcomes = _run_all(root, batch)  # builds each into root/<id>/, then loads it
            for s in batch:
                if not outcomes[s.id].fired:
                    silent.append(s.id)
                path = next(p for p in (root / s.id).iterdir() if not p.name.startswith("nested"))
                t0 = time.perf_counter()
                result = scan_file(path)
                t_scan += time.perf_counter() - t0
                by_container[s.id.rsplit("-", 1)[-1]] += 1
                if result.verdict is None or result.verdict < Severity.HIGH:
                    summary = [(f.rule, str(f.severity), f.trigger) for f in result.findings]
                    misses.append(f"{s.id} {summary[:4]} {result.error}")
            print(f"  {min(start + _BATCH, n)}/{n}: {len(misses)} missed, {len(silent)} silent")
    print(f"flagged at the default level: {n - len(misses)}/{n}; scan time {t_scan:.1f} s")
    print(f"fired under the real loader: {n - len(silent)}/{n}")
    for line in misses:
        print("MISS", line)
    for sid in silent:
        print("SILENT", sid)
    return 1 if misses or silent else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
