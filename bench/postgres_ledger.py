"""The PostgreSQL ledger as a cluster uses it: N processes (ranks), one stream each, one
step record per step, on one server.

Usage: python bench/postgres_ledger.py URL [N ...]   (default N: 8 16 32)
URL: what scripts/start-test-postgres.sh prints (each run uses a fresh schema).
For each N, three runs:
  plain    records/s over all ranks, p50/p99 seconds one append takes (a step's time
           in the ledger)
  restart  the server restarted (pg_ctl restart -m fast) in the middle: records
           written late, none missing, chain verified
  kill     one rank SIGKILLed in the middle of its appends: chain verified, the rank
           without a run-end record named
Restart needs the server of scripts/start-test-postgres.sh on this machine (its data
folder in $TRAINGUARD_PG_STATE, default /tmp/trainguard-test-postgres).
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

STEPS = 200
STATE = os.environ.get("TRAINGUARD_PG_STATE", "/tmp/trainguard-test-postgres")


def payload(rank: int, step: int) -> dict[str, object]:
    """About the size of a guard's step record (digests, loss, timings, rng)."""
    return {
        "after": uuid.uuid4().hex * 2,
        "optimizer": uuid.uuid4().hex * 2,
        "plain": {"after": uuid.uuid4().hex, "optimizer": uuid.uuid4().hex},
        "tensors": {"after": uuid.uuid4().hex * 4},
        "loss": 1.0 / (step + 1),
        "grad_norm": 0.5,
        "step_time": 0.1,
        "rng": {"torch": uuid.uuid4().hex[:16], "python": uuid.uuid4().hex[:16]},
        "lr": [0.001],
        "rank": rank,
    }


def rank_main(url: str, run: str, rank: int, steps: int, pace: float, out: mp.Queue) -> None:
    from trainguard.ledger import open_ledger

    ledger = open_ledger(url)
    ledger.append(run, "run-start", {"rank": rank}, step=0, stream=rank)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        ledger.append(run, "step", payload(rank, step), step=step, stream=rank)
        times.append(time.perf_counter() - t)
        if pace:
            time.sleep(pace)
    ledger.append(run, "run-end", {"steps": steps}, step=steps, stream=rank)
    ledger.close()
    out.put((rank, times, getattr(ledger, "outages", 0)))


def restart_server() -> float:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    pg_ctl = bins[-1] if bins else "pg_ctl"
    # -l: the new server must not inherit our pipes (run() would wait for them forever).
    cmd = [pg_ctl, "-D", f"{STATE}/data", "-l", f"{STATE}/server.log", "-m", "fast", "-w"]
    cmd.append("restart")
    if os.getuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def run(base: str, n: int, kind: str) -> str:
    import psycopg

    from trainguard.ledger import open_ledger, verify_ledger

    schema = f"tg_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    run_id = f"bench-{kind}-{n}"
    out: mp.Queue = mp.Queue()
    pace = 0.02 if kind != "plain" else 0.0  # spread the run so the event lands inside it
    procs = [
        mp.Process(target=rank_main, args=(url, run_id, r, STEPS, pace, out)) for r in range(n)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    note = ""
    if kind == "restart":
        time.sleep(1.5)
        note = f"server restart took {restart_server():.1f} s; "
    elif kind == "kill":
        time.sleep(1.5)
        os.kill(procs[n // 2].pid, signal.SIGKILL)  # mid-run: almost surely inside an append
    results = {}
    for _ in range(n - (kind == "kill")):
        rank, times, outages = out.get(timeout=600)
        results[rank] = (times, outages)
    for p in procs:
        p.join(timeout=60)
    wall = time.monotonic() - started
    ledger = open_ledger(url)
    problems = verify_ledger(ledger, run_id)
    records = list(ledger.records(run_id))
    ended = {r.stream for r in records if r.kind == "run-end"}
    steps = sum(r.kind == "step" for r in records)
    late = sum(r.payload.get("written_late", 0) for r in records if r.kind == "ledger-outage")
    ledger.close()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
    all_times = sorted(t for times, _ in results.values() for t in times)
    p50 = statistics.median(all_times)
    p99 = all_times[int(0.99 * (len(all_times) - 1))]
    line = (
        f"{n:2d} ranks {kind:7s}: {steps} step records in {wall:.1f} s "
        f"({steps / wall:.0f} records/s), append p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms; "
        f"{note}verify: {'intact' if not problems else f'{len(problems)} problem(s)'}"
    )
    if kind == "restart":
        line += f"; written late: {late}, missing: {n * STEPS - steps}"
    if kind == "kill":
        line += f"; rank(s) without run-end: {sorted(set(range(n)) - ended)}"
    return line


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    base = sys.argv[1]
    worlds = [int(a) for a in sys.argv[2:]] or [8, 16, 32]
    for n in worlds:
        for kind in ("plain", "restart", "kill"):
            print(run(base, n, kind), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
