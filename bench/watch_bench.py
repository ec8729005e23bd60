"""Overhead of trainguard.watch on every step of a ~100M-parameter model (CPU).

Usage: .venv/bin/python bench/watch_bench.py [--steps 12] [--width 4096] [--layers 6]
                                             [--budget 0.02] [--pass-grad-norm]

Trains two identical models, one unwatched and one under a guard, in
alternating blocks (so both see the same machine state); reports the median
step time of each, the overhead, and the cost of one parameter fingerprint on
its own.  The guard lives through all blocks, after a warm-up that is not
timed (with --budget its first 16 boundaries are always checked exactly).
--pass-grad-norm hands the guard what clip_grad_norm_ returned
(measure_grad_norm=False), as docs/watch.md recommends for the lowest overhead.
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
    model: Any,
    opt: Any,
    n: int,
    width: int,
    guard: Any = None,
    batch: int = 32,
    pass_grad_norm: bool = False,
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
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if guard is not None:
            guard.step(loss=loss, batch=x, grad_norm=norm if pass_grad_norm else None)
        times.append(time.perf_counter() - start)
    return times


def _time_inside(guard: Any) -> list[float]:
    """Accumulate the wall time spent in the guard's per-step code (a one-item list).

    The difference of two models' medians is noisy at the percent level; the guard's
    own time is what the overhead consists of.
    """
    total = [0.0]
    for name in ("_before_step", "_after_step", "_finish_step"):
        original = getattr(guard, name)

        def timed(*a: Any, _f: Any = original, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                total[0] += time.perf_counter() - start

        setattr(guard, name, timed)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--batch", type=int, default=32, help="rows per step: more compute per parameter"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="watch(..., budget=B): docs/watch.md"
    )
    parser.add_argument(
        "--pass-grad-norm", action="store_true", help="guard.step(grad_norm=clip's result)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed watched steps first")
    args = parser.parse_args()

    import logging

    import torch

    # The watched model idles while the unwatched one runs its block: the guard would
    # report those gaps as stalls (TG1307), which says nothing about its overhead.
    logging.getLogger("trainguard").setLevel(logging.ERROR)

    from trainguard.monitor import guard as tgw
    from trainguard.monitor.fingerprint import Fingerprinter

    model, opt = build(args.width, args.layers)
    w_model, w_opt = build(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    steps(model, opt, 2, args.width)  # allocate optimizer state, warm caches
    steps(w_model, w_opt, 2, args.width)
    plain: list[float] = []
    watched: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        guard = tgw.watch(
            w_model,
            w_opt,
            ledger=str(Path(tmp) / "ledger.sqlite"),
            budget=args.budget,
            measure_grad_norm=not args.pass_grad_norm,
        )
        steps(w_model, w_opt, args.warmup, args.width, guard, args.batch, args.pass_grad_norm)
        inside = _time_inside(guard)
        checked_before = guard.checked_boundaries
        for _ in range(args.blocks):
            plain += steps(model, opt, args.steps, args.width, batch=args.batch)[1:]
            watched += steps(
                w_model, w_opt, args.steps, args.width, guard, args.batch, args.pass_grad_norm
            )[1:]
        checked = guard.checked_boundaries - checked_before
        timed = args.blocks * args.steps
        sampled = guard.sampled_share
        guard_seconds = inside[0]
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
    mode = "exact (every boundary)" if args.budget is None else f"budget {args.budget:g}"
    grad = "grad norm passed in" if args.pass_grad_norm else "grad norm measured by the guard"
    print(f"guard: {mode}, {grad}; full fingerprints at {checked}/{timed} timed boundaries")
    if args.budget is not None:
        print(f"sampled at every other boundary: {100 * sampled:.1f}% of the 1 MiB chunks")
    print(f"unwatched step: {p:.3f}s  watched step: {w:.3f}s  overhead: {100 * (w - p) / p:+.1f}%")
    per_step = guard_seconds / (args.blocks * args.steps)
    print(
        f"time inside the guard's hooks and guard.step: {1000 * per_step:.1f} ms per step "
        f"({100 * per_step / p:.1f}% of the unwatched step)"
    )
    print(
        f"one fingerprint of all parameters: {statistics.median(fp_times) * 1000:.1f} ms "
        "(two per watched step)"
    )


if __name__ == "__main__":
    main()
