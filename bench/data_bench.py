"""Costs of sealed data (docs/data.md): sealing, a checked read, and the per-step record.

Seals a 20,000-row .npy shard of 12 KB rows (245 MB) in a temporary folder, reads 2,000
samples through SealedDataset, and times the guard's per-step sample record for a batch
of 256 such rows.  Run on an idle machine: python bench/data_bench.py [ROWS]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainguard.data.seal import seal_dataset, verify_dataset
from trainguard.data.sealed import SealedDataset
from trainguard.monitor.samples import SampleRecorder
from trainguard.signing.keys import write_keypair


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        np.save(folder / "data" / "x.npy", np.random.rand(rows, 3 * 32 * 32).astype(np.float32))
        size = os.path.getsize(folder / "data" / "x.npy")
        private, public = write_keypair(folder / "k")
        started = time.perf_counter()
        sealed = seal_dataset([folder / "data"], private)
        seal_s = time.perf_counter() - started
        started = time.perf_counter()
        verify_dataset(folder / "data", public)
        verify_s = time.perf_counter() - started
        print(f"seal: {size / 1e6:.0f} MB, {rows} samples in {seal_s:.2f} s "
              f"({size / 1e6 / seal_s:.0f} MB/s); verify (unchanged) {verify_s:.2f} s; "
              f"sidecar {os.path.getsize(sealed.leaves)} bytes")  # fmt: skip
        data: Any = SealedDataset(folder / "data", public)
        started = time.perf_counter()
        for i in range(min(2000, rows)):
            data[i]
        read_us = (time.perf_counter() - started) / min(2000, rows) * 1e6
        print(f"read and check: {read_us:.0f} us per 12 KB sample")
        loader: Any = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)
        recorder = SampleRecorder(loader, b"k" * 32)
        batch = [torch.as_tensor(next(iter(loader)))]
        times = []
        for _ in range(20):
            started = time.perf_counter()
            entry = recorder.record(batch)
            times.append(time.perf_counter() - started)
        print(f"per-step record, 256 x 12 KB: {statistics.median(times) * 1e3:.1f} ms; "
              f"{len(str(entry))} characters in the step record")  # fmt: skip


if __name__ == "__main__":
    main()
