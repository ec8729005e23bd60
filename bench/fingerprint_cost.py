"""Cost of one fingerprint (``Fingerprinter.sums``) of a 100M-parameter model's tensors.

Usage: .venv/bin/python bench/fingerprint_cost.py [--threads N] [--repeats N]

6 x (4096 x 4096 weight + 4096 bias), float32, CPU: what watch_bench.py's 100M model
holds.  Prints the median and minimum wall and thread-CPU time of one call, the
threads torch used and the load average.  Version 1's figures in docs/benchmarks.md
were measured the same way on the file as of commit 14048c9^.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch

    from trainguard.monitor.fingerprint import FINGERPRINT_VERSION, Fingerprinter

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tensors = []
    for _ in range(6):
        tensors += [torch.randn(4096, 4096), torch.randn(4096)]
    fp = Fingerprinter(b"k" * 32)
    fp.sums(tensors)  # tables built, memory touched
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        fp.sums(tensors)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    print(
        f"fingerprint v{FINGERPRINT_VERSION}, {sum(t.numel() for t in tensors) / 1e6:.1f}M "
        f"parameters, {torch.get_num_threads()} thread(s): wall median "
        f"{statistics.median(walls) * 1e3:.0f} ms (min {min(walls) * 1e3:.0f}), thread CPU "
        f"median {statistics.median(cpus) * 1e3:.0f} ms (min {min(cpus) * 1e3:.0f}); "
        f"load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
