"""Per-step cost of the surface check (monitor/checks/surface.py) beside a 1M-parameter step.

Times, on this process: one honest training step of a ~1M-parameter MLP (batch 64,
Adam), a full sweep of the surface, one sampled hook, and the amortized cost per step
(two hooks per step, one of every 2*SWEEP_EVERY hooks a full sweep).  Run on an idle
machine: python bench/surface_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

import trainguard.monitor.guard  # noqa: F401 - its modules are on the surface
from trainguard.monitor.alerts import Context
from trainguard.monitor.checks.surface import SurfaceCheck


def median_seconds(fn: object, repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512), torch.randn(64, 512)
    params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step_s = median_seconds(step)
    check = SurfaceCheck(b"k" * 32)
    full_s = median_seconds(lambda: all(s.same() for s in check.spaces))
    # Let the check learn what a step calls, the way the guard's hooks do.
    check.after_step(Context(0, 0))
    step()
    check.after_step(Context(1, 0))
    ctx = Context(2, 0)
    hot_s = median_seconds(check._hot.changed)
    per_hook = statistics.fmean(
        [median_seconds(lambda: check._check(ctx), repeat=1) for _ in range(4 * check.every)]
    )
    per_step = 2 * per_hook
    hot = sum(len(s.keys) for s in check.hot)
    print(f"parameters {params:,}; surface: {len(check.spaces)} namespaces, {check.entries} names")
    print(f"hot names (seen called in a step): {hot} in {len(check.hot)} namespaces")
    print(f"hot names, one check       {hot_s * 1e3:8.3f} ms")
    print(f"training step (median)   {step_s * 1e3:8.3f} ms")
    print(f"full sweep               {full_s * 1e3:8.3f} ms")
    print(f"per step, amortized      {per_step * 1e3:8.3f} ms  ({per_step / step_s:.1%} of a step)")


if __name__ == "__main__":
    main()
