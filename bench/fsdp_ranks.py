"""trainguard.watch on FSDP2 at many ranks (gloo, CPU): the scenarios of tests/test_fsdp.py
at 16 and 32 ranks, and the guard's cost per step and collective traffic against 1 rank.

Usage: python bench/fsdp_ranks.py [WORLD ...] [--no-honest] [--flip-only] [--kill-only]
(default worlds: 1 16 32)
Each world size runs: an honest run (nothing at high/critical, `ledger verify` passes),
the scale-triggered patch (flip and scale, armed at step 10 on one rank holding elements,
only when world >= 8), and a rank killed after step 8 with the guard's default grace
period and notes (FSDP_WORKER_DEFAULT_WAITS=1; a 40 s process-group timeout): only the
dead rank may be named stopped (TG1311), survivors still blocked in a collective are
named blocked (TG1314).  Prints one line per scenario.
On a 2-core machine the ranks share the cores: step times are the machine's, not the
cluster's; the guard's own seconds per step are what compare.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_fsdp import launch, serious, verify

AT = 10


def stats(tmp: Path, world: int) -> tuple[float, int]:
    overheads, traffic = [], 0
    for rank in range(world):
        f = tmp / f"rank{rank}.0.json.stats"
        if f.exists():
            data = json.loads(f.read_text())
            overheads += data["overheads"][3:]
            traffic = max(traffic, int(data["sync_bytes"]))
    return (statistics.median(overheads) if overheads else float("nan")), traffic


def run(world: int, scenario: str, steps: int) -> tuple[dict[int, dict], Path, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"fsdp{world}-"))
    started = time.monotonic()
    # 32 ranks on 2 cores take minutes per run: a generous bound per run.
    results = launch(tmp, world, [f"fsdp/{scenario}@{steps}"], timeout=1800)[0]
    return results, tmp, time.monotonic() - started


def honest(world: int) -> None:
    results, tmp, wall = run(world, "clean", 30)
    found = [a for a in serious(results) if not a["evidence"].get("at_start")]
    ok = verify(tmp / "ledger.0.sqlite").returncode == 0
    overhead, traffic = stats(tmp, world)
    print(
        f"world {world:2d} honest: {len(found)} high/critical, ledger verify "
        f"{'passes' if ok else 'FAILS'}, guard {overhead * 1e3:.2f} ms/step (median), "
        f"rank comparison {traffic} bytes received per rank every 5 steps, wall {wall:.0f} s",
        flush=True,
    )


FLAGS = ("--no-honest", "--flip-only", "--kill-only")


def main() -> int:
    unknown = [a for a in sys.argv[1:] if a.startswith("-") and a not in FLAGS]
    if unknown or any(not a.isdigit() for a in sys.argv[1:] if not a.startswith("-")):
        # Minutes of multi-process runs are not what a mistyped option (or --help) asks for.
        print(__doc__, file=sys.stderr)
        return 0 if unknown in (["--help"], ["-h"]) else 2
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    worlds = [int(a) for a in args] or [1, 16, 32]
    kinds: tuple[str, ...] = ("flip",) if "--flip-only" in sys.argv else ("flip", "scale")
    if "--kill-only" in sys.argv:
        kinds = ()
    os.environ["FSDP_WORKER_DEFAULT_WAITS"] = "1"  # the kill runs with the guard's defaults
    for world in worlds:
        if "--no-honest" not in sys.argv and "--kill-only" not in sys.argv:
            honest(world)
        if world < 8:
            continue
        chunk = -(-13 // world)
        target = (-(-13 // chunk)) - 1  # the last rank that holds elements
        for kind in kinds:
            results, _tmp, wall = run(world, f"scaled:{kind}:{target}:{AT}:8", AT + 5)
            found = [a for a in serious(results) if not a["evidence"].get("at_start")]
            first = min((a["step"] for a in found), default=None)
            named = sorted({a["rank"] for a in found if a["step"] == first})
            print(
                f"world {world:2d} {kind} on rank {target} at step {AT}: first high/critical at "
                f"step {first} by rank(s) {named}, {len(found)} in all, wall {wall:.0f} s",
                flush=True,
            )
        victim = world // 2
        results, _tmp, wall = run(world, f"kill:{victim}:8", 16)
        stopped = [
            (rank, a["evidence"]["stopped_rank"])
            for rank, r in results.items()
            for a in r.get("alerts", [])
            if a["rule"] == "TG1311"
        ]
        blocked = sorted(
            {
                a["evidence"]["blocked_rank"]
                for r in results.values()
                for a in r.get("alerts", [])
                if a["rule"] == "TG1314"
            }
        )
        survivors = {r for r, s in stopped if s == victim}
        others = sorted({s for _, s in stopped if s != victim})
        print(
            f"world {world:2d} rank {victim} killed after step 8: named stopped by "
            f"{len(survivors)} survivor(s); other ranks named stopped: {others or 'none'}; "
            f"named blocked (TG1314): {blocked or 'none'}, wall {wall:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
