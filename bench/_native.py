"""Large benign files written by the genuine libraries (``torch.save``, ``pickle.dump``).

``trainguard.samples`` streams its large files to disk without holding them in
memory, so its pickles differ from what the libraries write: no memo (every
tensor repeats its ``GLOBAL`` opcodes), an ``OrderedDict`` at the top.  Some
scanners react to that (modelaudit flags the repeated globals), so the benchmark
also scans files of the same size written the ordinary way, and reports both.
These need the whole file in memory once (500 MiB by default), which is fine here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

_PART = 64 * 1024 * 1024  # one tensor per 64 MiB, as in trainguard.samples.large


def _parts(size_bytes: int) -> list[int]:
    total = max(4, size_bytes - size_bytes % 4)
    sizes = [_PART] * (total // _PART)
    if total % _PART:
        sizes.append(total % _PART)
    return sizes


def native_torch_checkpoint(path: Path, size_bytes: int) -> Path:
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.weight": torch.randn(n // 4, generator=gen) * 0.02
        for i, n in enumerate(_parts(size_bytes))
    }
    torch.save(state, path)
    return path


def native_numpy_pickle(path: Path, size_bytes: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        f"layer_{i}": rng.standard_normal(n // 4, dtype=np.float32)
        for i, n in enumerate(_parts(size_bytes))
    }
    with open(path, "wb") as fh:
        pickle.dump(arrays, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path
