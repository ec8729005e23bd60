"""Safe loading speed: trainguard.load and a protected torch.load against torch.load.

Usage: .venv/bin/python bench/load_bench.py [--size-mb 1024] [--repeat 5]

Builds a checkpoint of real torch.save layout (many tensors, like a model's
state dict), then times, alternating so the page cache treats all alike:
torch.load(weights_only=True), torch.load(weights_only=False), trainguard.load
and torch.load under trainguard.protect(). Prints the median of each and the
ratio to weights_only=True, the bar the issue sets (<= 1.1x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import torch

    import trainguard
    from trainguard.samples import build_large_torch_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        build_large_torch_checkpoint(path, args.size_mb << 20)
        size = path.stat().st_size
        torch.load(path, weights_only=True)  # warm the page cache and torch's lazy imports

        def protected() -> Any:
            trainguard.protect()
            try:
                return torch.load(path, weights_only=True)
            finally:
                trainguard.unprotect()

        runs: dict[str, Callable[[], Any]] = {
            "torch.load(weights_only=True)": lambda: torch.load(path, weights_only=True),
            "torch.load(weights_only=False)": lambda: torch.load(path, weights_only=False),
            "trainguard.loader": lambda: trainguard.load(path),
            "torch.load under protect()": protected,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                times[name].append(_time(fn))
    base = statistics.median(times["torch.load(weights_only=True)"])
    print(
        f"checkpoint: {size / 2**20:.0f} MiB, torch {torch.__version__}, "
        f"{args.repeat} runs each, median seconds"
    )
    print(f"{'loader':34} {'median s':>9} {'min s':>7} {'vs weights_only':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34} {med:9.3f} {min(ts):7.3f} {med / base:15.2f}x")


if __name__ == "__main__":
    main()
