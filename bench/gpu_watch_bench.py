"""The guard's cost per step on a GPU model, exact and budget mode.

Usage: python bench/gpu_watch_bench.py [--params-m 100] [--steps 40]
Without CUDA it says so and exits 0 (nothing measured).  Prints one line per mode:
median step seconds without the guard, with it, and the guard's share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import trainguard


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, guard: object) -> float:
    times = []
    for _ in range(n):
        x = torch.randn(32, model[0].in_features, device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss)  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[n // 4 :])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (the CUDA path is untested here)", file=sys.stderr)
        return 0
    width = int((args.params_m * 1e6 / 4) ** 0.5)
    for mode, budget in (("exact", None), ("budget 0.02", 0.02)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        base = steps(model, opt, args.steps, None)
        guard = trainguard.watch(model, opt, budget=budget, hang_seconds=None)
        watched = steps(model, opt, args.steps, guard)
        guard.close()
        print(
            f"{torch.cuda.get_device_name()} {args.params_m:.0f}M params {mode}: "
            f"{base * 1e3:.2f} ms -> {watched * 1e3:.2f} ms ({(watched / base - 1) * 100:+.1f}%)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
