"""How far an honest run's claimed step times stray from the ledger server's clock.

Trains the verifier bench's MLP under ``watch`` on a PostgreSQL ledger, then feeds the
run's records to the verifier's server-clock check (explain/verifier/clock.py) and prints
the largest rise of "server elapsed minus claimed elapsed" over any stretch of steps, for
the step times and the wall times, beside the slack the check allows (CLOCK_SLACK_S).
``LOAD`` processes spin on the CPU meanwhile (a loaded host); ``HIDE`` seconds of sleep
per step are hidden from the guard's clock (what the check must catch).

    .venv/bin/python bench/server_clock_bench.py URL [STEPS] [LOAD] [HIDE] [RUNS]
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid
from typing import Any

import torch

import trainguard
from trainguard.explain.verifier.clock import CLOCK_SLACK_S, ServerClock
from trainguard.ledger import open_ledger
from trainguard.monitor import clock

KEY = bytes(range(32))


def parts() -> tuple[Any, ...]:
    """The verifier bench's MLP, narrower: steps of a few milliseconds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
    batches = [(x[i : i + 64], x[i : i + 64, :1]) for i in range(0, 4096, 64)]

    def step(i: int) -> Any:
        xb, yb = batches[i % len(batches)]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def _spin() -> None:
    while True:
        pass


def run_once(url: str, steps: int, hide: float) -> tuple[dict[str, float], dict[str, float]]:
    model, opt, step = parts()
    run_id = f"clock-{uuid.uuid4().hex[:8]}"
    hidden = [0.0]
    real = clock._PERF_COUNTER
    if hide:
        clock._PERF_COUNTER = lambda: real() - hidden[0]  # type: ignore[assignment]
    try:
        guard = trainguard.watch(model, opt, ledger=url, run_id=run_id, key=KEY, hang_seconds=None)
        for i in range(steps):
            loss = step(i)
            if hide:
                time.sleep(hide)
                hidden[0] += hide
            guard.step(loss=loss, batch=None)
        guard.close()
    finally:
        clock._PERF_COUNTER = real
    check = ServerClock()
    with open_ledger(url, create=False) as ledger:  # type: ignore[attr-defined]
        for record in ledger.records(run_id):
            check.feed(record)
    check.judge(final=True)
    stream = check.streams[0]
    return stream.claimed.widest, stream.wall.widest


def main() -> None:
    url = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    load = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    hide = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    runs = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    try:
        print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, {load} spinners")
        for i in range(runs):
            t0 = time.perf_counter()
            claimed, wall = run_once(url, steps, hide)
            took = time.perf_counter() - t0
            print(
                f"run {i}: {steps} steps in {took:.1f} s, hidden {hide * steps:.2f} s; largest "
                f"rise/fall from the run-start record: step_time {claimed['rise']:.3f}/"
                f"{claimed['fall']:.3f} s, wall time {wall['rise']:.3f}/{wall['fall']:.3f} s "
                f"(slack {CLOCK_SLACK_S} s)"
            )
    finally:
        for p in spinners:
            p.terminate()


if __name__ == "__main__":
    main()
