"""Keyed, exact, position-dependent fingerprints of tensors, computed on their own device.

A tensor's bytes are read as signed 8-bit integers ``x_j``, ``j`` the byte's index in the
whole tensor, in chunks of CHUNK (4,096) bytes: byte ``j`` sits at position ``p = j mod
CHUNK`` of chunk ``c = j div CHUNK``.  Sixteen rows of weights, eight drawn from a secret
per-run key and eight from a public seed (SHAKE-256), give each chunk sixteen exact
integer sums, which 64-bit multipliers, one per row and chunk, combine::

    S[r, c] = sum_p  x[c * CHUNK + p] * W[r, p]          (exact integers: |S| <= 2**25)
    keyed   = sum_c sum_(r keyed)  S[r, c] * U[r, c]     (mod 2**64)

with each ``W[r, p]`` uniform in [-64, 63] and each ``U[r, c]`` a uniform 64-bit word (row
``c mod TABLE`` of SHAKE-256 of the seed and ``c div TABLE``); the *plain* sum is the same
over the eight public rows.

Security.  The attacker knows this code, the public rows and every tensor, and may make any
change at all: flip bits, move bits or bytes between elements, permute rows, swap chunks,
all at once.  It does not know the key, so to it the keyed weights and multipliers are
uniformly random (it sees keyed sums only through a keyed BLAKE2b).  Let ``d`` be the
change's byte differences: not all zero, each within [-255, 255].  The keyed sum stays
equal only if either (a) every keyed ``S[r, c]`` stays equal, in particular in a chunk
``c`` where ``d`` is nonzero at some position ``p``: per row, with the row's other weights
fixed, ``W[r, p]`` must be the one value of 128 that cancels the rest, independently for
eight rows, odds ``2**-56``; or (b) some ``S[r, c]`` changes by ``D``, ``0 < |D| < 2**26``
(255 * 64 * 4096), so ``D = 2**t * odd`` with ``t <= 25``, and the total still agrees mod
2**64: with the weights and the other multipliers fixed, ``U[r, c] * D`` must hit one
residue, which at most ``2**t`` of the ``2**64`` values of ``U[r, c]`` do, odds at most
``2**-39``.  So a change goes unseen with odds below ``2**-38`` per try, whatever is
changed, moved or permuted (version 2: ``2**-33``; version 1 XORed one constant into every
word: permuting words left it equal).

The *plain* sum is the same with public tables: anyone holding the tensors can recompute it
(a replay without the run's key compares these).  The same odds hold for a change made
without regard to the public tables (a fault, a bug); none against someone who edits
weights on purpose.

Exact on any machine: every product and partial sum is an integer far below the range of
the arithmetic that computes it, so no rounding, saturation or overflow happens in any
order of additions, and a replay on another host, thread count or device gets the same two
integers.  On x86 CPUs the products are one int8 x int8 -> int32 matrix product per block
of chunks (``torch._int_mm``: oneDNN's VNNI/AMX kernels, the bytes read in place whatever
the dtype; about 0.12 ns per byte on one core of an AVX-512 EPYC).  The weights have 7 bits
because oneDNN's kernels for CPUs without VNNI add pairs of products in saturating 16-bit
lanes: 255 * 64 * 2 fits, 255 * 128 * 2 does not (8-bit weights gave wrong sums with
``ONEDNN_MAX_CPU_ISA=AVX2``; tests/test_fingerprint_arithmetic.py runs that ISA).
Elsewhere the same products run in float32, one per 1,024 bytes of a chunk (CPUs without
oneDNN: every partial sum is an integer of magnitude at most 2**23, exact in float32, TF32
or bfloat16 inputs alike), or on a GPU in float64, the same way.

Blocks compose: a shard names the position of its bytes in the whole tensor, so they meet
the same weights and multipliers there, and the sums are linear: those of any set of blocks
that tile a tensor (cut anywhere, empty blocks included) add up, mod 2**64, to the whole
tensor's (:func:`compose`).  Replicas hold the same label and the same sums.

Cost: the bytes are read once, in place; a chunk cut by a run's start or end is copied,
zero-padded (4 KiB); small runs are copied into one pack per call (one product for them
all: a small tensor's cost is the ops run for it); the scratch per product is bounded
(BLOCK chunks); the multipliers take 128 bytes per chunk (3%), drawn per TABLE chunks where
runs reach (a rank holding the last shard of a tensor holds those of its shard, not of the
whole); the weights take 64 KiB.  On a CPU every product runs on one torch thread (an op
split over torch's OpenMP threads waits for its other half on a loaded machine, and OpenMP
does not survive fork()); long runs are cut into stretches for a thread pool instead.  Only
two integers per tensor leave the device; the digest that goes to the ledger is a keyed
BLAKE2b over those integers, the tensor names, shapes and dtypes.

Sharded tensors (FSDP2's DTensors) are read where they live: each rank sums its own
slice, of whatever size (an empty one included), and names it by the slice
(``0.weight[4:8]``, see sharding.py); nothing is gathered.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from trainguard.monitor.sharding import is_dtensor, local, shard, state_owner

# The math of the sums; a ledger records it in run-start, and digests of another
# version are never compared with these (replay says which version recorded them).
FINGERPRINT_VERSION = 3
CHUNK = 1 << 12  # bytes per chunk: a weight per position in it, a multiplier per chunk
EXACT32 = 1 << 10  # bytes per float product: partial sums within float32's 2**24
ROWS = 16  # weight rows: PLAIN public ones, then as many keyed ones
PLAIN = ROWS // 2
BLOCK = 1 << 8  # chunks per product on a CPU: 1 MiB, in cache with its sums (products of
# 64 KiB cost 2.5x more per byte, of 4 MiB 10% more); float32 copies it as floats (4 MiB)
DEVICE_BLOCK = 1 << 10  # on a GPU: fewer, larger kernels (32 MiB of float64 scratch)
TABLE = 1 << 12  # chunks per table of multipliers (16 MiB of bytes, 512 KiB of multipliers;
# a multiple of both blocks): drawn where runs reach, so a shard's rank holds its own only
SMALL = 1 << 16  # runs of at most this many bytes are copied into packs of about BLOCK
# chunks, one product per pack: below it a run costs more in ops than its copy costs
PUBLIC = b"trainguard fingerprint v3 public "  # the plain sums' tables (no secret)
ARITHMETICS = ("int8", "float32", "float64")  # all give the same sums
Place = tuple[tuple[int, ...], tuple[int, ...]]  # a block's offset, the whole tensor's shape


@dataclass(frozen=True)
class Fingerprint:
    """A group digest plus one digest per tensor, to say *which* tensor changed.

    ``plain`` and ``plain_per_tensor`` are the same over the plain sums only,
    hashed without the key: anyone holding the tensors can recompute them (a
    replay without the run's key compares these), so they prove less than the
    keyed ones against someone who edits weights on purpose.
    """

    digest: str
    per_tensor: tuple[tuple[str, str], ...]
    plain: str = ""
    plain_per_tensor: tuple[tuple[str, str], ...] = ()

    def changed(self, other: Fingerprint) -> list[str]:
        mine = dict(self.per_tensor)
        theirs = dict(other.per_tensor)
        names = sorted(set(mine) | set(theirs))
        return [n for n in names if mine.get(n) != theirs.get(n)]

    def names(self) -> list[str]:
        return [n for n, _ in self.per_tensor]

    def compact(self) -> str:
        """Per tensor, in order: 4 hex digits of the keyed digest, then 4 of the plain one.

        Enough to name which tensors differ (a changed tensor goes unnamed with
        odds of 1 in 65,536); the group digests are what prove equality.
        """
        plain = dict(self.plain_per_tensor)
        return "".join(f"{d[:4]}{plain.get(n, '')[:4]:0<4}" for n, d in self.per_tensor)


class Fingerprinter:
    def __init__(self, key: bytes | None = None, arithmetic: str | None = None) -> None:
        """``arithmetic``: one of ARITHMETICS (tests compare them; a replay host may pin
        one; int8 on CPUs only); None: int8 on x86 CPUs with oneDNN, float32 on other
        CPUs and Apple's MPS, float64 on other devices."""
        if arithmetic is not None and arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic {arithmetic!r} is none of {ARITHMETICS}")
        self.key = key or secrets.token_bytes(32)
        self.arithmetic = arithmetic
        self._tables: dict[tuple[Any, str | int], Any] = {}

    def _table(self, torch: Any, device: Any, what: str | int) -> Any:
        """A table on ``device``: the CHUNK x ROWS weights as an arithmetic's dtype
        ("int8", "float32", "float64"), or for an int ``b``, the TABLE x ROWS multipliers
        (int64) of chunks ``b * TABLE`` on, drawn when a run first reaches them."""
        found = self._tables.get((device, what))
        if found is not None:
            return found
        if isinstance(what, int):
            made = torch.cat(
                [_words(PUBLIC + b"chunk", what), _words(b"chunk" + self.key, what)], 1
            )
        else:
            made = torch.cat([_weights(PUBLIC + b"byte"), _weights(b"byte" + self.key)], 1)
            made = made.to(getattr(torch, what))
        self._tables[(device, what)] = made = made.to(device)
        return made

    def _multipliers(self, torch: Any, device: Any, first: int, count: int) -> Any:
        """The multipliers of chunks ``first`` to ``first + count - 1`` (count x ROWS): a
        view where they lie in one table, else a copy."""
        parts = []
        while count:
            b, at = divmod(first, TABLE)
            take = min(count, TABLE - at)
            parts.append(self._table(torch, device, b)[at : at + take])
            first, count = first + take, count - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _arithmetic(self, torch: Any, device: Any) -> str:
        if self.arithmetic is not None and (self.arithmetic != "int8" or device.type == "cpu"):
            return self.arithmetic
        if device.type == "mps":
            return "float32"  # no float64 there
        if device.type != "cpu":
            return "float64"
        # Where torch._int_mm does not reach oneDNN it multiplies in plain loops, some
        # hundred times slower than BLAS in float32; before torch 2.3 it has no CPU kernel.
        fast = platform.machine().lower() in ("x86_64", "amd64")
        fast = fast and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        return "int8" if fast and _int8_works(torch) else "float32"

    def sums(
        self, tensors: Sequence[Any], places: Sequence[Place | None] | None = None
    ) -> list[tuple[int, int]]:
        """(plain, keyed) position-dependent sums of each tensor's bytes.

        ``places``: where each tensor sits in the whole tensor it is a block of (the
        block's offset and the whole shape); a block's sums then add up, modulo 2**64,
        with the other blocks' to the whole tensor's (:func:`compose`).  None: the
        tensor is read as a whole tensor of its own.
        """
        import torch

        # Per device, a ROWS-vector per tensor: a run of bytes adds its sums to its row.
        totals: dict[Any, Any] = {}
        packs: dict[Any, _Pack] = {}
        with _one_thread(torch) as threads:
            for i, t in enumerate(tensors):
                data = local(t).detach()
                if not data.numel():
                    continue
                place = places[i] if places is not None else None
                for run, start in _runs(torch, data, place):
                    raw = run.reshape(-1).view(torch.int8)
                    device = raw.device
                    if device not in totals:
                        totals[device] = torch.zeros(
                            len(tensors), ROWS, dtype=torch.int64, device=device
                        )
                        packs[device] = _Pack()
                    if raw.numel() > SMALL:
                        totals[device][i] += self._run(torch, raw, start, threads)
                    elif packs[device].add(i, raw, start) >= BLOCK:
                        self._flush(torch, packs[device], totals[device])
            for device, pack in packs.items():
                if pack.ids:
                    self._flush(torch, pack, totals[device])
        out = [(0, 0)] * len(tensors)
        # One transfer per device: a device sync per tensor would cost more than the
        # reductions on a GPU.
        for total in totals.values():
            pairs = total.view(len(tensors), 2, PLAIN).sum(dim=2).tolist()  # (plain, keyed)
            out = [(int(a + c), int(b + d)) for (a, b), (c, d) in zip(out, pairs, strict=True)]
        return [(_signed(a), _signed(b)) for a, b in out]

    def _flush(self, torch: Any, pack: _Pack, total: Any) -> None:
        """The packed small runs' sums, added to their tensors' rows of ``total``: one
        product for them all (the cost of a small tensor is the ops run for it)."""
        device = total.device
        arithmetic = self._arithmetic(torch, device)
        weights = self._table(torch, device, arithmetic)
        zeros = torch.zeros(CHUNK, dtype=torch.int8, device=device)
        pieces = [zeros[:p] if isinstance(p, int) else p for p in pack.pieces]
        products = _products(torch, torch.cat(pieces).view(-1, CHUNK), weights, arithmetic)
        if max(pack.chunks) < TABLE:  # the usual case: whole small tensors, one gather
            at = torch.tensor(pack.chunks, dtype=torch.int64, device=device)
            multipliers = self._table(torch, device, 0)[at]
        else:
            runs = [self._multipliers(torch, device, f, n) for f, n in pack.runs]
            multipliers = torch.cat(runs)
        ids = torch.tensor(pack.ids, dtype=torch.int64, device=device)
        total.index_add_(0, ids, products * multipliers)
        pack.clear()

    def _run(self, torch: Any, raw: Any, start: int, threads: int) -> Any:
        """The ROWS weighted sums (int64, mod 2**64) of one contiguous run of bytes
        ``raw`` (int8) whose first byte is byte ``start`` of the whole tensor.  Whole
        chunks are read in place; a chunk the run starts or ends inside is copied,
        zero-padded (zeros add nothing, so the blocks that share a chunk add up to it)."""
        n, lead, first = raw.numel(), start % CHUNK, start // CHUNK
        chunks = -(-(lead + n) // CHUNK)  # chunks the run touches
        arithmetic = self._arithmetic(torch, raw.device)
        weights = self._table(torch, raw.device, arithmetic)
        head = min(n, -lead % CHUNK)  # bytes before the first chunk boundary
        full, tail = divmod(n - head, CHUNK)
        edges, at = [], []  # the cut chunks, and their multipliers
        if head:
            edges.append(torch.zeros(CHUNK, dtype=torch.int8, device=raw.device))
            edges[-1][lead : lead + head] = raw[:head]
            at.append(self._multipliers(torch, raw.device, first, 1))
        if tail:
            edges.append(torch.zeros(CHUNK, dtype=torch.int8, device=raw.device))
            edges[-1][:tail] = raw[n - tail :]
            at.append(self._multipliers(torch, raw.device, first + chunks - 1, 1))
        total = torch.zeros(ROWS, dtype=torch.int64, device=raw.device)
        if edges:
            products = _products(torch, torch.stack(edges), weights, arithmetic)
            total += (products * torch.cat(at)).sum(dim=0)
        if not full:
            return total
        body = raw[head : head + full * CHUNK].view(full, CHUNK)
        origin = first + (1 if head else 0)  # the body's first chunk in the whole tensor
        step = BLOCK if raw.device.type == "cpu" else DEVICE_BLOCK

        def stretch(begin_end: tuple[int, int]) -> Any:
            begin, end = begin_end
            part = torch.zeros(ROWS, dtype=torch.int64, device=raw.device)
            with _one_thread(torch):  # a pool thread's own setting
                b = begin
                while b < end:
                    # Steps end on multiples of ``step`` in the whole tensor: each lies in
                    # one table of multipliers, read as a view.
                    e = min(end, b + step - (origin + b) % step)
                    products = _products(torch, body[b:e], weights, arithmetic)
                    multipliers = self._multipliers(torch, raw.device, origin + b, e - b)
                    part += (products * multipliers).sum(dim=0)
                    b = e
            return part

        ways = _ways(raw.device, threads, full)
        cuts = [full * k // ways for k in range(ways + 1)]
        stretches = list(itertools.pairwise(cuts))
        if ways == 1:
            return total + stretch(stretches[0])
        # The caller's thread takes the first stretch: one hand-off fewer.
        pending = [_pool(ways - 1).submit(stretch, s) for s in stretches[1:]]
        total += stretch(stretches[0])
        for p in pending:
            total += p.result()
        return total

    def fingerprint(self, named: Iterable[tuple[str, Any]]) -> Fingerprint:
        """Digests per tensor (per local shard, named by its slice) and for the group.

        A tensor this rank holds whole hashes as ``name|shape|dtype|sums``; a
        shard as ``name[slice]|global shape|dtype|sums``, so equal labels on two
        ranks mean the same elements of the same tensor.
        """
        items = [shard(n, t) for n, t in named if t is not None]
        places = [(s.offset, s.global_shape) if s.sharded else None for s in items]
        sums = self.sums([s.local for s in items], places)
        per: list[tuple[str, str]] = []
        plain_per: list[tuple[str, str]] = []
        group = hashlib.blake2b(key=self.key[:32], digest_size=16)
        plain_group = hashlib.blake2b(digest_size=16)
        for s, (plain, keyed) in zip(items, sums, strict=True):
            name, shape, dtype = s.label, s.global_shape, s.local.dtype
            h = hashlib.blake2b(key=self.key[:32], digest_size=8)
            h.update(f"{name}|{shape}|{dtype}|{plain}|{keyed}".encode())
            d = h.hexdigest()
            per.append((name, d))
            group.update(f"{name}={d};".encode())
            p = hashlib.blake2b(f"{name}|{shape}|{dtype}|{plain}".encode(), digest_size=8)
            plain_per.append((name, p.hexdigest()))
            plain_group.update(f"{name}={p.hexdigest()};".encode())
        return Fingerprint(group.hexdigest(), tuple(per), plain_group.hexdigest(), tuple(plain_per))

    def digest_bytes(self, *parts: bytes) -> str:
        h = hashlib.blake2b(key=self.key[:32], digest_size=16)
        for p in parts:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        return h.hexdigest()


def compose(parts: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The (plain, keyed) sums of a whole tensor from those of blocks that tile it."""
    plain = keyed = 0
    for a, b in parts:
        plain, keyed = plain + a, keyed + b
    return _signed(plain), _signed(keyed)


def _signed(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


def _weights(seed: bytes) -> Any:
    """CHUNK x PLAIN int8 weights, uniform in [-64, 63], from SHAKE-256 of ``seed``."""
    import torch

    raw = bytearray(hashlib.shake_256(seed).digest(CHUNK * PLAIN))
    drawn = torch.frombuffer(raw, dtype=torch.uint8).to(torch.int16)
    return ((drawn & 127) - 64).to(torch.int8).view(CHUNK, PLAIN)


def _words(seed: bytes, b: int) -> Any:
    """TABLE x PLAIN uniform int64, the multipliers of chunks ``b * TABLE`` on: SHAKE-256
    of ``seed`` and ``b`` (8 bytes, little-endian), row by row."""
    import torch

    raw = bytearray(hashlib.shake_256(seed + b.to_bytes(8, "little")).digest(8 * PLAIN * TABLE))
    return torch.frombuffer(raw, dtype=torch.int64).view(TABLE, PLAIN)


class _Pack:
    """Small runs laid out chunk-aligned for one product: the pieces to concatenate (an
    int: that many zero bytes), and per chunk of it, its tensor and its chunk index."""

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.ids: list[int] = []
        self.chunks: list[int] = []
        self.runs: list[tuple[int, int]] = []  # (first chunk, chunks) of each run

    def add(self, i: int, raw: Any, start: int) -> int:
        """Adds tensor ``i``'s run ``raw`` at byte ``start``; returns the chunks held."""
        lead, first = start % CHUNK, start // CHUNK
        count = -(-(lead + raw.numel()) // CHUNK)
        pad = count * CHUNK - lead - raw.numel()
        self.pieces += [p for p in (lead, raw, pad) if p is raw or p]  # no empty pads
        self.ids += [i] * count
        self.chunks += range(first, first + count)
        self.runs.append((first, count))
        return len(self.ids)

    def clear(self) -> None:
        self.pieces, self.ids, self.chunks, self.runs = [], [], [], []


_INT8: list[bool] = []  # torch._int_mm runs on CPU tensors (asked once)


def _int8_works(torch: Any) -> bool:
    if not _INT8:
        try:
            ones = torch.ones(1, CHUNK, dtype=torch.int8)
            _INT8.append(int(torch._int_mm(ones, ones.t().contiguous())) == CHUNK)
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT8.append(False)
    return _INT8[0]


def _products(torch: Any, x: Any, weights: Any, arithmetic: str) -> Any:
    """``x @ weights`` for int8 chunks ``x`` (m x CHUNK), exact: int32 or int64."""
    if arithmetic == "int8":
        return torch._int_mm(x, weights)
    # A product per EXACT32 bytes of the chunks keeps every partial sum exact in float32.
    parts = x.view(x.shape[0], CHUNK // EXACT32, EXACT32).transpose(0, 1).to(weights.dtype)
    products = torch.bmm(parts, weights.view(CHUNK // EXACT32, EXACT32, ROWS))
    return products.to(torch.int64).sum(dim=0)


if sys.byteorder != "little":  # a number's bytes are read in memory order
    raise ImportError("trainguard's fingerprints assume a little-endian machine")


# By process: a pool inherited through fork() has no threads (its tasks would wait forever).
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
MIN_CHUNKS_PER_THREAD = 1 << 11  # 8 MiB: a shorter stretch is not worth a thread's hand-off
# (under load the hand-off itself waited a millisecond: 4 MiB took 1.25 ms on 2 threads, 0.69 on 1)
_OPENMP: list[bool] = []  # torch's parallel backend is OpenMP (asked once)


def _ways(device: Any, threads: int, chunks: int) -> int:
    if device.type != "cpu":
        return 1  # one stream of kernels: the device runs them in parallel itself
    return max(1, min(threads, chunks // MIN_CHUNKS_PER_THREAD))


def _pool(ways: int) -> ThreadPoolExecutor:
    key = (os.getpid(), ways)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(ways, thread_name_prefix="trainguard-fp")
    return _POOLS[key]


@contextmanager
def _one_thread(torch: Any) -> Iterator[int]:
    """torch's intra-op threads set to one in this thread while the sums run; yields the
    setting found.  oneDNN and MKL split a product over OpenMP threads: on a loaded
    machine each split waited milliseconds for its other half (a 4 KiB product took 16 ms
    at load 4 on 2 cores), and a child forked after a split hangs in its next one.  With
    OpenMP the setting is the calling thread's own, but torch also keeps it as the default
    for threads that have run no parallel op yet: one that runs its first while the sums
    run keeps one thread (restored for later ones on leaving).  With torch's native pool
    the setting cannot change once the pool has started, so it is left alone."""
    threads = int(torch.get_num_threads())
    if not _OPENMP:
        _OPENMP.append("parallel backend: OpenMP" in torch.__config__.parallel_info())
    toggle = threads > 1 and _OPENMP[0]
    if toggle:
        torch.set_num_threads(1)
    try:
        yield threads
    finally:
        if toggle:
            torch.set_num_threads(threads)


def _runs(torch: Any, data: Any, place: Place | None) -> Iterator[tuple[Any, int]]:
    """(bytes, offset of its first byte in the whole tensor) for each contiguous run of
    the whole tensor that the block ``data`` holds: one for a whole tensor or a block of
    leading rows (FSDP), one per leading index when a later dimension is split."""
    size = data.element_size()  # of an element of the whole tensor (complex: both parts)
    if data.is_complex():
        data = torch.view_as_real(data)
    data = data.contiguous()
    if data.dtype == torch.bool:
        data = data.view(torch.uint8)
    if place is None or not data.dim():
        yield data, 0
        return
    offset, shape = place
    local = tuple(data.shape)[: len(shape)]
    split = [d for d in range(len(shape)) if offset[d] or local[d] != shape[d]]
    if not split:
        yield data, 0
        return
    k = split[-1]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    for lead in itertools.product(*(range(n) for n in local[:k])):
        start = sum((offset[d] + i) * strides[d] for d, i in enumerate(lead))
        start += offset[k] * strides[k]
        yield data[lead], start * size


def optimizer_tensors(optimizer: Any) -> list[tuple[str, Any]]:
    """This rank's optimizer state tensors, named by parameter index and slot.

    Sharded moments come as their local slice, named with it (``3.exp_avg[4:8]``);
    under ``ZeroRedundancyOptimizer`` only the state of the parameters this rank
    owns exists here, numbered among all the parameters.
    """
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(params)}  # as optimizer.state_dict() numbers them
    state_of = state_owner(optimizer).state
    # In parameter order, not in the order the state was created: a state
    # restored by load_state_dict fingerprints like the one it was saved from.
    ordered = sorted(state_of.items(), key=lambda kv: index.get(id(kv[0]), len(index)))
    named = []
    for p, state in ordered:
        for slot, value in sorted(state.items(), key=lambda kv: str(kv[0])):
            if isinstance(value, torch.Tensor):
                name = f"{index.get(id(p), '?')}.{slot}"
                if not is_dtensor(value):  # held whole: named as it is (budget mode's hot path)
                    named.append((name, value))
                    continue
                s = shard(name, value)
                named.append((s.label, s.local))
    return named


def hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's settings, without the parameters themselves."""
    groups = []
    for g in optimizer.param_groups:
        groups.append({k: _plain(v) for k, v in sorted(g.items()) if k != "params"})
    return groups


def _plain(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    return repr(v)
