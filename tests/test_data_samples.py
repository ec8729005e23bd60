"""The indices a guard records for a step are those of the batch the loader yielded last:
with worker processes drawing ahead, persistent workers, drop_last, and batches a loop
dropped (generative: a random loader and loop, seed printed)."""

from __future__ import annotations

import random
import secrets
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from trainguard.monitor.samples import SampleRecorder


class _Sealed:
    """Sample i is the tensor [i]: a batch says which indices it came from."""

    trainguard_sealed = True
    digest = "0" * 64

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return torch.tensor([float(i)])


def test_recorded_indices_are_the_yielded_batch() -> None:
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    workers = rnd.choice([0, 0, 2])
    options: dict[str, Any] = {"num_workers": workers, "drop_last": rnd.random() < 0.5}
    if workers:
        options.update(persistent_workers=rnd.random() < 0.5, prefetch_factor=rnd.randint(1, 4))
    size, batch = rnd.randint(5, 40), rnd.randint(1, 6)
    print(f"seed {seed}: {size} samples, batch {batch}, {options}")
    dataset: Any = _Sealed(size)
    loader: Any = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True,
        generator=torch.Generator().manual_seed(seed), **options,
    )  # fmt: skip
    recorder = SampleRecorder.for_loader(loader, secrets.token_bytes(32))
    assert recorder is not None
    steps = 0
    for _ in range(3):
        it = iter(loader)
        for _ in range(rnd.randint(0, 2)):  # batches the loop drops (a mid-epoch start)
            next(it, None)
        for b in it:
            entry = recorder.record([b])
            assert recorder.last_indices == [int(v) for v in b[:, 0]], seed
            assert entry["n"] == len(b) and entry["indices"] is not None
            steps += 1
    assert steps > 0 or size < 3 * batch


def test_a_loader_that_is_not_over_sealed_data_is_not_recorded() -> None:
    plain: Any = list(range(8))
    loader: Any = torch.utils.data.DataLoader(plain, batch_size=2)
    assert SampleRecorder.for_loader(loader, b"k" * 32) is None
    assert not hasattr(loader.batch_sampler.sampler, "inner")  # nothing was wrapped
