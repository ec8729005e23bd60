"""Overhead of trainguard.watch on every step, exact mode and budget mode (CPU).

Usage: .venv/bin/python bench/watch_bench.py [--params 1M|100M] [--budget 0.02]
                                             [--modes exact,budget] [--blocks N] [--steps N]
                                             [--profile N]

Per mode, two identical MLPs train in alternating blocks (so both see the same
machine state), one unwatched and one under a guard that lives through every
block after untimed warm-up steps (budget mode's schedule settles in them).
Prints one line per mode:

* the median step of each model, wall and thread CPU time (``time.thread_time``,
  which a loaded machine inflates much less than wall time), and their A/B
  difference: on a shared machine the A/B is noisy at the percent level;
* the guard's own time inside the process (its optimizer hooks and
  ``guard.step``, thread CPU), per step and as a share of the unwatched step:
  what the overhead consists of;
* the guard's whole cost: the A/B difference of the median thread CPU per step, in
  ms (the three methods above plus everything they leave out: forward and backward
  hooks, torch.compiler.disable wrappers, tensor hooks, garbage collection), and of
  the fastest decile's (steadier on a loaded machine);
* the load average before and after.

``--profile N``: after the A/B, N more watched steps under cProfile; prints the
trainguard functions by their own time (what the whole cost is made of; cProfile
inflates Python-heavy code, so read the shares, not the milliseconds).

``1M``: 4 x Linear(512, 512), GELU, batch 32, one thread (a millisecond-step
model).  ``100M``: 6 x Linear(4096, 4096), GELU, batch 32, torch's default
threads.  AdamW, clip_grad_norm_ whose result is handed to ``guard.step``
(``measure_grad_norm=False``), as docs/watch.md recommends.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {  # width, layers, threads (0: torch's default), steps per block, blocks, warm-up
    "1M": (512, 4, 1, 60, 8, 80),
    "100M": (4096, 6, 0, 12, 3, 20),
}


def build(width: int, layers: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    mods: list[Any] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*mods)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def steps(model: Any, opt: Any, n: int, x: Any, guard: Any = None) -> list[tuple[float, float]]:
    """``n`` training steps; (wall, thread CPU) seconds of each."""
    import torch

    times = []
    for _ in range(n):
        wall, cpu = time.perf_counter(), time.thread_time()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if guard is not None:
            guard.step(loss=loss, batch=x, grad_norm=norm)
        times.append((time.perf_counter() - wall, time.thread_time() - cpu))
    return times


def time_inside(cls: Any) -> tuple[list[float], list[bool], Any]:
    """Patch the guard class's per-step methods (before a guard binds them into its
    hooks) to add their thread CPU time to a one-item list while ``active[0]`` is set.
    Returns the list, the switch and a function that restores the class."""
    total, active = [0.0], [False]
    originals = {n: getattr(cls, n) for n in ("_before_step", "_after_step", "_finish_step")}
    for name, original in originals.items():

        def timed(self: Any, *a: Any, _f: Any = original, **k: Any) -> Any:
            start = time.thread_time()
            try:
                return _f(self, *a, **k)
            finally:
                if active[0]:
                    total[0] += time.thread_time() - start

        setattr(cls, name, timed)

    def restore() -> None:
        for name, original in originals.items():
            setattr(cls, name, original)

    return total, active, restore


def run_mode(size: str, budget: float | None, args: argparse.Namespace) -> str:
    import torch

    from trainguard.monitor import guard as tgw
    from trainguard.monitor.budget import WARMUP_STEPS

    width, layers, _, per_block, blocks, warmup = SIZES[size]
    per_block, blocks = args.steps or per_block, args.blocks or blocks
    model, opt = build(width, layers)
    w_model, w_opt = build(width, layers)
    x = torch.randn(args.batch, width, generator=torch.Generator().manual_seed(1))
    steps(model, opt, 3, x)
    load = os.getloadavg()[0]
    plain: list[tuple[float, float]] = []
    watched: list[tuple[float, float]] = []
    inside, active, restore = time_inside(tgw.Guard)
    with tempfile.TemporaryDirectory() as tmp:
        guard = tgw.watch(
            w_model,
            w_opt,
            ledger=str(Path(tmp) / "ledger.sqlite"),
            budget=budget,
            measure_grad_norm=False,
        )
        steps(w_model, w_opt, warmup, x, guard)
        active[0] = True
        for _ in range(blocks):
            # The first step of a block pays for the other model's caches: left out.
            plain += steps(model, opt, per_block, x)[1:]
            watched += steps(w_model, w_opt, per_block, x, guard)[1:]
        active[0] = False
        timed = blocks * per_block
        profile = _profile(w_model, w_opt, x, guard, args.profile) if args.profile else ""
        total = guard.step_index
        schedule = getattr(guard, "schedule", None)  # None: exact mode, or before schedules
        guard.close()
    restore()
    load_after = os.getloadavg()[0]
    p_wall, w_wall = (statistics.median(t[0] for t in s) for s in (plain, watched))
    p_cpu, w_cpu = (statistics.median(t[1] for t in s) for s in (plain, watched))
    per_step = inside[0] / timed
    mode = "exact" if budget is None else f"budget {budget:g}"
    line = (
        f"{size} {mode}: step {1e3 * p_wall:.2f} ms unwatched, {1e3 * w_wall:.2f} ms watched "
        f"(A/B {100 * (w_wall - p_wall) / p_wall:+.1f}% wall, "
        f"{100 * (w_cpu - p_cpu) / p_cpu:+.1f}% thread CPU); "
        f"guard in-process {1e3 * per_step:.2f} ms/step ({100 * per_step / p_cpu:.1f}% of the "
        f"unwatched step's CPU), whole {1e3 * (w_cpu - p_cpu):.2f} ms/step (thread CPU A/B; "
        f"fastest decile {1e3 * (_decile(watched) - _decile(plain)):.2f} ms); "
        f"load {load:.1f}->{load_after:.1f}"
    )
    if schedule is not None:
        ran = {u: n - WARMUP_STEPS for u, n in schedule.runs_at.items()}
        chance = {u: round(p, 3) for u, p in schedule.chance.items()}
        line += (
            f"\n  schedule at the end: chance per step {chance}; steps each unit ran at "
            f"after the warm-up, of {total - WARMUP_STEPS}: {ran}"
        )
    return line + profile


def _decile(times: list[tuple[float, float]]) -> float:
    """The 10th percentile of the steps' thread CPU: on a loaded machine the median of
    both sides moves by more than the guard costs; their fastest steps much less."""
    cpu = sorted(t[1] for t in times)
    return cpu[len(cpu) // 10]


def _profile(model: Any, opt: Any, x: Any, guard: Any, n: int) -> str:
    """``n`` watched steps under cProfile: trainguard's functions by their own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    steps(model, opt, n, x, guard)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats("trainguard|eval_frame", 25)
    body = out.getvalue()
    start = body.find("   ncalls")
    return f"\n  profile of {n} watched steps (own time):\n" + body[start:].rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=sorted(SIZES), default="1M")
    parser.add_argument("--budget", type=float, default=0.02, help="budget mode's budget")
    parser.add_argument("--modes", default="exact,budget", help="exact, budget or both")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (0: the size's)")
    parser.add_argument("--blocks", type=int, default=0, help="blocks per model (0: the size's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--profile", type=int, default=0, help="steps to profile (0: none)")
    args = parser.parse_args()

    import logging

    import torch

    # The watched model idles while the unwatched one runs its block: the guard would
    # report those gaps as stalls (TG1307), which says nothing about its overhead.
    logging.getLogger("trainguard").setLevel(logging.ERROR)
    threads = SIZES[args.params][2]
    if threads:
        torch.set_num_threads(threads)
    width, layers = SIZES[args.params][:2]
    params = layers * (width * width + width)
    print(
        f"{params / 1e6:.2f}M parameters ({layers} x Linear({width}, {width})), AdamW, batch "
        f"{args.batch}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s)"
    )
    for mode in args.modes.split(","):
        budget = None if mode.strip() == "exact" else args.budget
        print(run_mode(args.params, budget, args), flush=True)


if __name__ == "__main__":
    main()
