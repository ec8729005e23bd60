"""Overhead of trainguard.watch on every step of a ~100M-parameter model (CPU).

Usage: .venv/bin/python bench/watch_bench.py [--steps 12] [--width 4096] [--layers 6]

Runs the same training loop unwatched and watched (alternating blocks, so
both see the same machine state), reports the median step time of each and
the overhead, and the cost of one parameter fingerprint on its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def build(width: int, layers: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    mods: list[Any] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*mods)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def steps(
    model: Any, opt: Any, n: int, width: int, guard: Any = None, batch: int = 32
) -> list[float]:
    import torch

    times = []
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        start = time.perf_counter()
        x = torch.randn(batch, width, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if guard is not None:
            guard.step(loss=loss, batch=x)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--batch", type=int, default=32, help="rows per step: more compute per parameter"
    )
    args = parser.parse_args()

    import torch

    from trainguard.watch import guard as tgw
    from trainguard.watch.fingerprint import Fingerprinter

    model, opt = build(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    steps(model, opt, 2, args.width)  # allocate optimizer state, warm caches
    plain: list[float] = []
    watched: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.blocks):
            plain += steps(model, opt, args.steps, args.width, batch=args.batch)[1:]
            guard = tgw.watch(model, opt, ledger=str(Path(tmp) / "ledger.sqlite"))
            watched += steps(model, opt, args.steps, args.width, guard, args.batch)[1:]
            guard.close()
    fp = Fingerprinter()
    named = list(model.named_parameters())
    fp_times = []
    for _ in range(5):
        start = time.perf_counter()
        fp.fingerprint(named)
        fp_times.append(time.perf_counter() - start)
    p, w = statistics.median(plain), statistics.median(watched)
    print(
        f"model: {n_params / 1e6:.1f}M parameters, AdamW, batch {args.batch}, "
        f"torch {torch.__version__},"
        f" {torch.get_num_threads()} threads"
    )
    print(f"unwatched step: {p:.3f}s  watched step: {w:.3f}s  overhead: {100 * (w - p) / p:+.1f}%")
    print(
        f"one fingerprint of all parameters: {statistics.median(fp_times) * 1000:.1f} ms "
        "(two per watched step)"
    )


if __name__ == "__main__":
    main()
