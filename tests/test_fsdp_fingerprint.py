"""Fingerprints of whatever a rank may hold: any dtype, any size (odd byte counts, empty),
non-contiguous views, and the slice labels of sharded tensors.

Generated cases (fresh seed each run, printed): a fingerprint is deterministic, and one
flipped bit anywhere changes the tensor's digest.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from tests.tensor_dtypes import DTYPES  # noqa: E402
from trainguard.monitor.fingerprint import Fingerprinter  # noqa: E402
from trainguard.monitor.sharding import label  # noqa: E402


def _tensor(rng: random.Random) -> torch.Tensor:
    dtype = rng.choice(DTYPES)
    shape = [rng.randrange(0, 7) for _ in range(rng.randrange(1, 4))]
    t = (torch.rand(shape, dtype=torch.float64) * 100).to(dtype)
    if t.dim() > 1 and rng.random() < 0.5:
        t = t.transpose(0, -1)  # non-contiguous
    if t.numel() > 2 and rng.random() < 0.3:
        t = t.reshape(-1)[1:]  # an odd offset into its storage
    return t


def _flip_one_bit(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    raw = t.detach().contiguous().clone()
    if raw.is_complex():
        raw = torch.view_as_real(raw).contiguous()
    data = raw.reshape(-1).view(torch.uint8)
    i = rng.randrange(data.numel())
    if t.dtype == torch.bool:  # a bool byte holds 0 or 1: flip that bit only
        data[i] ^= 1
    else:
        data[i] ^= 1 << rng.randrange(8)
    out = data.view(raw.dtype).reshape(raw.shape)
    return torch.view_as_complex(out) if t.is_complex() else out


def test_any_tensor_fingerprints_and_one_bit_shows() -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    fp = Fingerprinter(b"k" * 32)
    for _ in range(200):
        t = _tensor(rng)
        first = fp.fingerprint([("t", t)])
        assert fp.fingerprint([("t", t.clone())]).digest == first.digest, (seed, t.dtype)
        if t.numel() == 0:
            continue
        changed = fp.fingerprint([("t", _flip_one_bit(t, rng))])
        assert changed.digest != first.digest, (seed, t.dtype, tuple(t.shape))


@pytest.mark.parametrize(
    ("offset", "local", "shape", "expected"),
    [
        ((0, 0), (13, 7), (13, 7), "w"),  # the whole tensor: its name alone
        ((4, 0), (4, 7), (13, 7), "w[4:8]"),  # FSDP's row shard
        ((12, 0), (1, 7), (13, 7), "w[12:13]"),  # the uneven last one
        ((3, 0), (0, 13), (3, 13), "w[3:3]"),  # an empty shard
        ((0, 8), (13, 8), (13, 16), "w[:,8:16]"),  # a column shard (tensor parallel)
    ],
)
def test_shard_labels(
    offset: tuple[int, ...], local: tuple[int, ...], shape: tuple[int, ...], expected: str
) -> None:
    assert label("w", offset, local, shape) == expected
