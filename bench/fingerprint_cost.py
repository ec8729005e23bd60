"""Cost of fingerprints (``Fingerprinter.sums``) per byte, by tensor size, threads and load.

Usage: .venv/bin/python bench/fingerprint_cost.py [--sizes 1M,16M,100M] [--threads 1,0]
       [--load 0,2] [--repeats N] [--module PATH]

For each size (float32 elements; ``100M`` and ``1Mmodel`` are the tensors of
watch_bench.py's models, 6 x (4096 x 4096 weight + bias) and 4 x (512 x 512 + bias);
``small`` 100 tensors of 512; other sizes are one tensor), each thread setting (0:
torch's default) and each load (that many busy processes spinning beside it), one
``sums`` call is timed ``--repeats`` times after a
warm-up.  Prints the median and minimum wall and thread-CPU time per call and per byte,
and the load average.  ``--module`` times another file's Fingerprinter instead (an older
version: ``git show b394022:src/trainguard/monitor/fingerprint.py > /tmp/fp2.py``), so the
two are measured the same way in the same minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any


def _spin(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _tensors(torch: Any, size: str) -> list[Any]:
    models = {"100M": (4096, 6), "1Mmodel": (512, 4)}  # watch_bench.py's models
    if size in models:
        width, layers = models[size]
        out = []
        for _ in range(layers):
            out += [torch.randn(width, width), torch.randn(width)]
        return out
    if size == "small":  # the cost per tensor: 100 tensors of 512 floats
        return [torch.randn(512) for _ in range(100)]
    scale = {"K": 1 << 10, "M": 1 << 20}
    return [torch.randn(int(size[:-1]) * scale[size[-1]] if size[-1] in scale else int(size))]


def _module(path: str) -> Any:
    if not path:
        from trainguard.monitor import fingerprint

        return fingerprint
    spec = importlib.util.spec_from_file_location("fingerprint_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1M,16M,100M")
    parser.add_argument("--threads", default="1,0", help="comma-separated; 0: torch's default")
    parser.add_argument("--load", default="0", help="comma-separated counts of busy processes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--module", default="", help="another fingerprint.py to time")
    args = parser.parse_args()
    import torch

    module = _module(args.module)
    default = torch.get_num_threads()
    fp = module.Fingerprinter(b"k" * 32)
    torch.manual_seed(0)
    for size in args.sizes.split(","):
        tensors = _tensors(torch, size)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        for load in (int(x) for x in args.load.split(",")):
            stop = multiprocessing.Event()
            spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(load)]
            for s in spinners:
                s.start()
            try:
                for threads in (int(x) for x in args.threads.split(",")):
                    torch.set_num_threads(threads or default)
                    fp.sums(tensors)  # tables built, memory touched
                    walls, cpus = [], []
                    for _ in range(args.repeats):
                        wall, cpu = time.perf_counter(), time.thread_time()
                        fp.sums(tensors)
                        walls.append(time.perf_counter() - wall)
                        cpus.append(time.thread_time() - cpu)
                    w, c = statistics.median(walls), statistics.median(cpus)
                    print(
                        f"fingerprint v{module.FINGERPRINT_VERSION} {size} floats "
                        f"({nbytes / 1e6:.0f} MB), {torch.get_num_threads()} thread(s), "
                        f"{load} spinner(s): wall median {w * 1e3:.2f} ms "
                        f"(min {min(walls) * 1e3:.2f}) = {w / nbytes * 1e9:.3f} ns/byte; "
                        f"thread CPU median {c * 1e3:.2f} ms (min {min(cpus) * 1e3:.2f}) = "
                        f"{c / nbytes * 1e9:.3f} ns/byte; load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            finally:
                stop.set()
                for s in spinners:
                    s.join()
        torch.set_num_threads(default)


if __name__ == "__main__":
    main()
