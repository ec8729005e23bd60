"""The fingerprint depends on where each bit sits (red team #11: fc1.weight's rows reversed
between steps, or an exponent bit moved from one weight to another at the same position in
its word, left version 1's two sums equal in exact and in budget mode, and would have left
replicas that differ by a permutation equal under the rank comparison).

Generated cases (fresh seed each run, printed): random tensors of every dtype and odd
sizes; a random permutation of their elements, a bit moved between two elements, and a
reversal of their rows each change both the keyed and the plain digest; the sums of the
blocks of a random layout (row shards, column shards, grids; offsets inside a chunk) add
up to the whole tensor's; and a run recorded with another fingerprint version is refused
by replay with a message naming the version, never compared.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

torch = pytest.importorskip("torch")

from tests.tensor_dtypes import DTYPES  # noqa: E402
from trainguard.monitor.fingerprint import (  # noqa: E402
    FINGERPRINT_VERSION,
    Fingerprinter,
    compose,
)


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return random.Random(seed)


def _tensor(rng: random.Random, dims: int | None = None) -> torch.Tensor:
    dtype = rng.choice(DTYPES)
    shape = [rng.randrange(1, 12) for _ in range(dims or rng.randrange(1, 4))]
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-120 if dtype != torch.uint8 else 0, 120, shape, generator=g).to(dtype)


def _bytes(t: torch.Tensor) -> bytes:
    t = torch.view_as_real(t) if t.is_complex() else t
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _differs(fp: Fingerprinter, a: torch.Tensor, b: torch.Tensor) -> bool:
    x, y = fp.fingerprint([("t", a)]), fp.fingerprint([("t", b)])
    return x.digest != y.digest and x.plain != y.plain


def _move_bit(t: torch.Tensor, rng: random.Random) -> torch.Tensor | None:
    """A bit set in one element moved to the same bit of another where it is clear."""
    raw = t.clone()
    raw = torch.view_as_real(raw) if raw.is_complex() else raw
    size = raw.element_size()
    data = raw.contiguous().reshape(-1).view(torch.uint8).clone()
    n = data.numel() // size
    bits = 1 if t.dtype == torch.bool else 8
    for _ in range(50):
        i, j = rng.sample(range(n), 2) if n > 1 else (0, 0)
        byte, bit = rng.randrange(size), rng.randrange(bits)
        a, b = i * size + byte, j * size + byte
        if i != j and data[a] >> bit & 1 and not data[b] >> bit & 1:
            data[a] ^= 1 << bit
            data[b] ^= 1 << bit
            out = data.view(raw.dtype).reshape(raw.shape)
            return torch.view_as_complex(out) if t.is_complex() else out
    return None


def test_permutations_bit_moves_and_row_reversals_change_the_digest(rng: random.Random) -> None:
    fp = Fingerprinter(rng.randbytes(32))
    tried = {"perm": 0, "bit": 0, "rows": 0}
    for _ in range(150):
        t = _tensor(rng)
        flat = t.reshape(-1)
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        perm = flat[torch.randperm(flat.numel(), generator=g)]
        if _bytes(perm) != _bytes(flat):
            tried["perm"] += 1
            assert _differs(fp, flat, perm), ("permutation", t.dtype, tuple(t.shape))
        moved = _move_bit(t, rng)
        if moved is not None:
            tried["bit"] += 1
            assert _differs(fp, t, moved), ("bit move", t.dtype, tuple(t.shape))
        if t.dim() >= 2:
            rows = t.flip(0)
            if _bytes(rows) != _bytes(t):
                tried["rows"] += 1
                assert _differs(fp, t, rows), ("rows reversed", t.dtype, tuple(t.shape))
    assert min(tried.values()) > 10, tried  # every family was exercised


def _cuts(rng: random.Random, n: int) -> list[int]:
    inner = sorted(rng.sample(range(1, n), rng.randrange(0, min(3, n - 1) + 1))) if n > 1 else []
    return [0, *inner, n]


def test_blocks_of_any_layout_compose_to_the_whole(rng: random.Random) -> None:
    fp = Fingerprinter(rng.randbytes(32))
    for _ in range(60):
        t = _tensor(rng, dims=rng.randrange(1, 4))
        shape = tuple(t.shape)
        whole = fp.sums([t])[0]
        # Split one or more dimensions (row shards, column shards, grids).
        cuts = [_cuts(rng, n) if rng.random() < 0.6 else [0, n] for n in shape]
        blocks, places = [], []
        grid: list[list[tuple[int, int]]] = [list(itertools.pairwise(c)) for c in cuts]
        for spans in _product(grid):
            index = tuple(slice(a, b) for a, b in spans)
            blocks.append(t[index])
            places.append((tuple(a for a, _ in spans), shape))
        assert compose(fp.sums(blocks, places)) == whole, (t.dtype, shape, cuts)


def _product(grid: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = [[]]
    for spans in grid:
        out = [[*o, s] for o in out for s in spans]
    return out


def test_long_tensors_compose_across_chunks(rng: random.Random) -> None:
    """Shards that cut the weights' chunks at unaligned byte offsets."""
    from trainguard.monitor.fingerprint import CHUNK

    fp = Fingerprinter(rng.randbytes(32))
    per_chunk = CHUNK // 4  # float32
    n = 4 * per_chunk + rng.randrange(1, 99)  # over four chunks
    t = torch.randn(n)
    cuts = sorted(rng.sample(range(1, n), 4))
    bounds = [0, *cuts, n]
    parts = fp.sums(
        [t[a:b] for a, b in itertools.pairwise(bounds)],
        [((a,), (n,)) for a in bounds[:-1]],
    )
    assert compose(parts) == fp.sums([t])[0]
    swapped = torch.cat([t[per_chunk * 2 :], t[: per_chunk * 2]])  # whole chunks exchanged
    assert fp.sums([swapped])[0] != fp.sums([t])[0]


def test_replay_refuses_a_ledger_of_another_fingerprint_version() -> None:
    from trainguard.explain.replay.engine import _mode
    from trainguard.explain.replay.ledger import ReplayError, RunHistory

    history = RunHistory("r", 0, {"key_id": "x"})  # a ledger from before versions were recorded: v1
    with pytest.raises(ReplayError, match="recorded with fingerprint v1"):
        _mode(history, None)
    for old in range(2, FINGERPRINT_VERSION):  # v2: words and their top halves
        history.start = {"fingerprint_version": old}
        with pytest.raises(ReplayError, match=f"recorded with fingerprint v{old};"):
            _mode(history, None)
    history.start = {"fingerprint_version": FINGERPRINT_VERSION}
    with pytest.raises(ReplayError, match="no plain fingerprints"):
        _mode(history, None)  # past the version check: the next refusal is another one


def test_a_long_tensor_read_by_several_threads_gives_the_same_sums(rng: random.Random) -> None:
    """Over MIN_CHUNKS_PER_THREAD chunks per thread, stretches go to a thread pool: the
    sums, and the composition of shards cut anywhere, do not depend on it."""
    from trainguard.monitor.fingerprint import CHUNK, MIN_CHUNKS_PER_THREAD

    fp = Fingerprinter(rng.randbytes(32))
    n = CHUNK // 4 * MIN_CHUNKS_PER_THREAD * 3 + rng.randrange(1, 999)  # float32: 3 threads' worth
    t = torch.randn(n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = fp.sums([t])[0]
        cut = rng.randrange(1, n)
        parts = fp.sums([t[:cut], t[cut:]], [((0,), (n,)), ((cut,), (n,))])
        torch.set_num_threads(1)
        one = fp.sums([t])[0]
    finally:
        torch.set_num_threads(threads)
    assert many == one == compose(parts)


_FORKED_CHILD = """
import os, torch
from trainguard.monitor.fingerprint import CHUNK, MIN_CHUNKS_PER_THREAD, Fingerprinter

fp = Fingerprinter(b"k" * 32)
# torch's OpenMP threads do not survive fork() (any parallel op in the child hangs, watched
# or not): the sums run every op on one torch thread, the padded end chunk included.
t = torch.randn(CHUNK // 4 * MIN_CHUNKS_PER_THREAD * 2 + 6)
torch.set_num_threads(2)
first = fp.sums([t])
pid = os.fork()
if pid == 0:
    os._exit(0 if fp.sums([t]) == first else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_fingerprints_after_its_parent_used_the_thread_pool() -> None:
    """Launchers fork ranks; a pool inherited through fork() has no threads.

    In a fresh interpreter: forked from the test process, whose earlier tests ran
    torch's OpenMP threads, the child can hang in any parallel op (seen in a full run).
    """
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FORKED_CHILD], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
