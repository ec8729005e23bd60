"""Throughput of a whole-store scan: one process vs --jobs N vs a local Ray cluster.

    .venv/bin/python bench/store_scan_bench.py [--files 10000] [--jobs 2]

Builds a store of small model files (pickled state dicts, safetensors headers,
numpy arrays, a few malicious pickles) and times `trainguard scan` over it in
each mode, as the user runs it (a fresh process each time, so start-up and, for
Ray, cluster start-up are included). Prints files/s and the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, n: int) -> None:
    evil = pickle.PROTO + b"\x02cos\nsystem\n(S'true'\ntR."
    for i in range(n):
        folder = root / f"team{i % 16}" / f"run{i // 500}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if i % 997 == 0:
            (folder / f"ckpt{i}.pt").write_bytes(evil)
        elif kind == 0:
            state = {f"layer{j}.weight": [float(j)] * 16 for j in range(8)}
            (folder / f"ckpt{i}.pt").write_bytes(pickle.dumps(state, protocol=4))
        elif kind == 1:
            header = json.dumps(
                {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
            ).encode()
            header += b" " * (-len(header) % 8)
            blob = struct.pack("<Q", len(header)) + header + bytes(64)
            (folder / f"model{i}.safetensors").write_bytes(blob)
        elif kind == 2:
            npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
            npy += b"{'descr': '<f4', 'fortran_order': False, 'shape': (16,), }".ljust(117) + b"\n"
            (folder / f"arr{i}.npy").write_bytes(npy + bytes(64))
        else:
            (folder / f"config{i}.json").write_text(json.dumps({"lr": 0.001, "step": i}))


def timed(argv: list[str]) -> tuple[float, int]:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{argv}: exit {proc.returncode}\n{proc.stderr.decode()[-2000:]}")
    return elapsed, len(json.loads(proc.stdout)["files"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        build(root, args.files)
        base = [sys.executable, "-m", "trainguard", "scan", str(root), "--format", "json"]
        modes = {
            "one process": base,
            f"--jobs {args.jobs}": [*base, "--jobs", str(args.jobs)],
            "--ray local": [*base, "--ray", "local"],
        }
        print(f"{args.files} files, {os.cpu_count()} CPUs")
        first = None
        for name, argv in modes.items():
            seconds, count = timed(argv)
            assert count == args.files, (name, count)
            first = first or seconds
            print(
                f"  {name:14} {seconds:7.2f} s  {args.files / seconds:8.0f} files/s  "
                f"{first / seconds:5.2f}x one process"
            )


if __name__ == "__main__":
    main()
