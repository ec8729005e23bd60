"""Fingerprint version 3's sums are the integers its docstring defines, however computed.

Generated cases (seed printed; ``TRAINGUARD_TEST_SEED=<seed>`` replays one): random tensors
of every dtype, placed as blocks at random offsets of a larger whole (some across the end
of the first table of multipliers), sum to a pure-Python reading of the docstring's formula
(SHAKE-256 tables, 7-bit weights, 64-bit multipliers)
in each arithmetic (int8 matrix products, float32, float64: the GPU's); long tensors cut
into random tilings (empty blocks, cuts inside a chunk, blocks of several thread
stretches) compose to the whole, under 1 and 3 threads; a random permutation of a
stretch, a bit moved between two elements, or two chunks swapped changes both sums.  And
oneDNN's kernels for CPUs without VNNI (``ONEDNN_MAX_CPU_ISA=AVX2``, ``AVX512_CORE``), which
add pairs of products in saturating 16-bit lanes, give the same sums on the bytes that
would saturate with 8-bit weights (they did: 30,720 wrong entries of 40 x 64 x 16).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import random
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.seeds import seeded  # noqa: E402
from tests.tensor_dtypes import DTYPES  # noqa: E402
from trainguard.monitor.fingerprint import (  # noqa: E402
    ARITHMETICS,
    BLOCK,
    CHUNK,
    MIN_CHUNKS_PER_THREAD,
    PLAIN,
    PUBLIC,
    TABLE,
    Fingerprinter,
    compose,
)


def _random(rng: random.Random, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if dtype == torch.bool:
        return torch.rand(n, generator=g) < 0.5
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float32 if dtype.is_complex else dtype).to(
            dtype
        )
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(torch.int8).to(dtype)


def _reference(key: bytes, data: bytes, start: int) -> tuple[int, int]:
    """The docstring's (plain, keyed) sums of ``data``, bytes ``start..`` of a whole tensor."""
    out = []
    for keyed in (False, True):
        seed = (lambda what: what + key) if keyed else (lambda what: PUBLIC + what)
        w = [(b & 127) - 64 for b in hashlib.shake_256(seed(b"byte")).digest(CHUNK * PLAIN)]
        tables: dict[int, bytes] = {}
        total = 0
        for j, byte in enumerate(data, start):
            x = byte - 256 if byte > 127 else byte
            c, p = divmod(j, CHUNK)
            b, row = divmod(c, TABLE)
            if b not in tables:
                stream = hashlib.shake_256(seed(b"chunk") + b.to_bytes(8, "little"))
                tables[b] = stream.digest(8 * PLAIN * TABLE)
            for r in range(PLAIN):
                at = 8 * (row * PLAIN + r)
                u = int.from_bytes(tables[b][at : at + 8], "little", signed=True)
                total += x * w[p * PLAIN + r] * u
        total &= (1 << 64) - 1
        out.append(total - (1 << 64) if total >> 63 else total)
    return out[0], out[1]


def _bytes(t: torch.Tensor) -> bytes:
    t = torch.view_as_real(t) if t.is_complex() else t
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def test_sums_are_the_documented_integers_in_every_arithmetic() -> None:
    rng = seeded()
    key = rng.randbytes(32)
    fps = [Fingerprinter(key, a) for a in ARITHMETICS]
    for _ in range(12):
        dtype = rng.choice(DTYPES)
        t = _random(
            rng, rng.randrange(1, 3 * CHUNK // torch.empty(0, dtype=dtype).element_size()), dtype
        )
        size = t.element_size()
        far = rng.choice([0, TABLE * CHUNK // size])  # sometimes across the first table's end
        offset = max(0, far - rng.randrange(0, t.numel() + 1)) if far else rng.randrange(3 * CHUNK)
        whole = offset + t.numel() + rng.randrange(0, 3 * CHUNK)
        expected = _reference(key, _bytes(t), offset * size)
        for fp in fps:
            assert fp.sums([t], [((offset,), (whole,))])[0] == expected, (fp.arithmetic, dtype)


def _tiling(rng: random.Random, n: int) -> list[int]:
    cuts = sorted(
        rng.choice([rng.randrange(0, n + 1), rng.randrange(0, 4) * CHUNK])
        for _ in range(rng.randrange(1, 6))
    )
    return [0, *(min(c, n) for c in cuts), n]  # repeated cuts: empty blocks


def test_random_tilings_compose_and_changes_show_over_blocks_and_threads() -> None:
    rng = seeded()
    fp = Fingerprinter(rng.randbytes(32))
    exact = Fingerprinter(fp.key, "float32")
    threads = torch.get_num_threads()
    try:
        for _ in range(5):
            dtype = rng.choice(DTYPES)
            size = torch.empty(0, dtype=dtype).element_size()
            longest = rng.choice([BLOCK, 3 * MIN_CHUNKS_PER_THREAD]) * CHUNK // size
            t = _random(rng, rng.randrange(1, longest), dtype)
            n = t.numel()
            torch.set_num_threads(rng.choice([1, 3]))
            whole = fp.sums([t])[0]
            assert exact.sums([t])[0] == whole
            bounds = _tiling(rng, n)
            parts = fp.sums(
                [t[a:b] for a, b in itertools.pairwise(bounds)], [((a,), (n,)) for a in bounds[:-1]]
            )
            assert compose(parts) == whole, (dtype, n, bounds)
            for changed in _changes(rng, t):
                if _bytes(changed) != _bytes(t):
                    now = fp.sums([changed])[0]
                    assert now[0] != whole[0] and now[1] != whole[1], (dtype, n)
    finally:
        torch.set_num_threads(threads)


def _changes(rng: random.Random, t: torch.Tensor) -> list[torch.Tensor]:
    """A stretch permuted, one bit moved between two elements, two chunks swapped."""
    raw = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1).view(torch.uint8)
    out = []
    a = rng.randrange(0, raw.numel())
    b = min(raw.numel(), a + rng.randrange(2, 4 * CHUNK))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    permuted = raw.clone()
    permuted[a:b] = raw[a:b][torch.randperm(b - a, generator=g)]
    out.append(permuted)
    moved = raw.clone()
    i, j = rng.randrange(raw.numel()), rng.randrange(raw.numel())
    bit = 1 << rng.randrange(8)
    if i != j and moved[i] & bit and not moved[j] & bit:
        moved[i] ^= bit
        moved[j] ^= bit
        out.append(moved)
    chunks = raw.numel() // CHUNK
    if chunks >= 2:
        c, d = rng.sample(range(chunks), 2)
        swapped = raw.clone()
        swapped[c * CHUNK : (c + 1) * CHUNK] = raw[d * CHUNK : (d + 1) * CHUNK]
        swapped[d * CHUNK : (d + 1) * CHUNK] = raw[c * CHUNK : (c + 1) * CHUNK]
        out.append(swapped)
    return out


_CHILD = """
import sys, torch
from trainguard.monitor.fingerprint import Fingerprinter

fp = Fingerprinter(b"k" * 32, "int8")
print(fp.sums([torch.tensor(list(map(int, line.split())), dtype=torch.int8) for line in sys.stdin]))
"""


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not torch.backends.mkldnn.is_available(),
    reason="oneDNN's x86 kernels",
)
def test_cpus_without_vnni_give_the_same_sums() -> None:
    """Bytes 127 (255 once oneDNN shifts them unsigned) next to each other meet every pair of
    weights; with 8-bit weights a pair of products overflowed the 16-bit lane."""
    rng = seeded()
    n = 16 * CHUNK + rng.randrange(0, CHUNK)
    cases = [[127] * n, [-128] * n, [rng.choice([127, -128]) for _ in range(n)]]
    cases.append([rng.randrange(-128, 128) for _ in range(n)])
    lines = "".join(" ".join(map(str, c)) + "\n" for c in cases)
    expected = Fingerprinter(b"k" * 32, "float64").sums(
        [torch.tensor(c, dtype=torch.int8) for c in cases]
    )
    children = {}
    for isa in ("AVX2", "AVX512_CORE"):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        children[isa] = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    for isa, child in children.items():
        out, err = child.communicate(lines, timeout=300)
        assert child.returncode == 0, err
        assert out.strip() == str(expected), isa
