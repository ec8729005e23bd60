"""Keyed, exact, position-dependent fingerprints of tensors, computed on their own device.

A tensor's bytes are read as the 8-byte words of the whole tensor, ``x_i`` (signed).
Each word is weighted by multipliers that depend on its index ``i`` and on a
secret per-run key, and so is its top half ``h_i = x_i >> 32``::

    keyed = sum_i  x_i * a_i  +  h_i * b_i      (mod 2**64)

with ``a_i = A[i mod WORDS] * U[i div WORDS]`` and ``b_i`` alike: a table of
WORDS random words per device and one odd weight per chunk of WORDS words, all
drawn from the key (SHAKE-256), so the weights never repeat along a tensor.  As
integers ``x = h * 2**32 + low`` (``low`` unsigned), the sum is a multilinear hash
of the 32-bit halves: a change that keeps the sum needs ``sum d_j k_j = 0 mod 2**64``
for unknown random ``k_j`` and a known nonzero difference of at most 32 bits, which
happens with odds of at most 2**-33 per try, whatever the attacker changes,
moves or permutes (version 1 XORed one constant into every word: permuting words, or
moving a bit between two words at the same position, left it equal).

The *plain* sum is the same with public tables: anyone holding the tensors can
recompute it (a replay without the run's key compares these), so it proves less
against someone who edits weights on purpose.

Blocks compose: a shard names the position of its bytes in the whole tensor, a word
split between two shards is read zero-padded by each (both its parts and their top
halves add up to the word's, since the lower part is below 2**32 or a multiple of
it), so the sums of any set of blocks that tile a tensor add up, mod 2**64, to the
whole tensor's (:func:`compose`).  Replicas hold the same label and the same sums.

Cost: on CPU one ``mv`` over each chunk (the keyed and the plain weights as two
rows) and one over its top halves: about one pass over the tensor's memory, with
the tables in cache; on a GPU elementwise products in chunks.  No copy of the
parameters is kept.  Only two integers per tensor leave the device; the digest that
goes to the ledger is a keyed BLAKE2b over those integers, the tensor names, shapes
and dtypes.

Sharded tensors (FSDP2's DTensors) are read where they live: each rank sums its own
slice, of whatever size (an empty one included), and names it by the slice
(``0.weight[4:8]``, see sharding.py); nothing is gathered.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from trainguard.monitor.sharding import is_dtensor, local, shard, state_owner

# The math of the sums; a ledger records it in run-start, and digests of another
# version are never compared with these (replay says which version recorded them).
FINGERPRINT_VERSION = 2
WORDS = 1 << 14  # words per chunk: 128 KiB; under torch's grain size, so no op here is split
# over threads (on a loaded machine a split op waits milliseconds for its other half)
PUBLIC = b"trainguard fingerprint v2 public "  # the plain sums' tables (no secret)
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
    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or secrets.token_bytes(32)
        self._tables: dict[tuple[Any, str], Any] = {}

    def _table(self, torch: Any, device: Any, what: str, size: int) -> Any:
        """A row table on ``device``: "words" (4 x WORDS: keyed then plain multipliers for
        the word and its top half) or "chunks" (at least ``size`` x 4, grown by doubling)."""
        found = self._tables.get((device, what))
        if found is not None and found.shape[0 if what == "chunks" else 1] >= size:
            return found
        if what == "words":
            rows = [_stream(b"word" + self.key, WORDS), _stream(PUBLIC + b"word", WORDS)]
            made = torch.stack([rows[0][0], rows[1][0], rows[0][1], rows[1][1]])
        else:
            n = max(64, 1 << (size - 1).bit_length())
            # Odd: a chunk's weight never drops the low bits of its sums.
            keyed, plain = _stream(b"chunk" + self.key, n), _stream(PUBLIC + b"chunk", n)
            made = torch.stack([keyed[0], plain[0], keyed[1], plain[1]], dim=1) | 1
        self._tables[(device, what)] = made = made.to(device)
        return made

    def sums(
        self, tensors: Sequence[Any], places: Sequence[Place | None] | None = None
    ) -> list[tuple[int, int]]:
        """(plain, keyed) position-dependent sums of each tensor's bits.

        ``places``: where each tensor sits in the whole tensor it is a block of (the
        block's offset and the whole shape); a block's sums then add up, modulo 2**64,
        with the other blocks' to the whole tensor's (:func:`compose`).  None: the
        tensor is read as a whole tensor of its own.
        """
        import torch

        out = []
        for i, t in enumerate(tensors):
            data = local(t).detach()
            place = places[i] if places is not None else None
            total = torch.zeros(4, dtype=torch.int64, device=data.device)
            if data.numel():
                for run, start in _runs(torch, data, place):
                    total = total + self._run(torch, run, start)
            # (plain, keyed): the word term plus the top-half term of each.
            out.append(torch.stack([total[1] + total[3], total[0] + total[2]]))
        if not out:
            return []
        # One transfer for all tensors: a device sync per tensor would cost more
        # than the reductions on a GPU.
        pairs = torch.stack([o.to("cpu") for o in out]).tolist()
        return [(int(a), int(b)) for a, b in pairs]

    def _run(self, torch: Any, data: Any, start: int) -> Any:
        """The four weighted sums of one contiguous run of bytes whose first byte is byte
        ``start`` of the whole tensor.  Words are the whole tensor's 8-byte words: a run
        that starts or ends inside one reads it zero-padded (the parts of a word add up
        to the word, and so do their top halves: see the module's docstring)."""
        raw = data.reshape(-1).view(torch.uint8)
        n, lead = raw.numel(), start % 8
        first = start // 8
        span = -(-(lead + n) // 8)  # words the run touches
        if lead or n % 8 or raw.data_ptr() % 8:
            padded = torch.zeros(span * 8, dtype=torch.uint8, device=raw.device)
            padded[lead : lead + n] = raw
            raw = padded
        words = raw.view(torch.int64)
        table = self._table(torch, words.device, "words", WORDS)
        halves = words.view(torch.int32)[1::2]  # little-endian: the top half of each word
        # Chunk-aligned stretches, one per thread on a CPU: every op below reads one chunk
        # (under torch's grain size, never split), and ops release the GIL.
        ways = _ways(torch, words, span)
        bounds = [0]
        for k in range(1, ways):
            cut = -(-(first + span * k // ways) // WORDS) * WORDS - first
            if bounds[-1] < cut < span:
                bounds.append(cut)
        bounds.append(span)
        stretches = list(itertools.pairwise(bounds))

        def stretch(begin_end: tuple[int, int]) -> list[Any]:
            begin, end = begin_end
            out = []
            scratch = torch.empty(min(end - begin, WORDS), dtype=torch.int64, device=words.device)
            at = begin
            while at < end:
                offset = (first + at) % WORDS
                take = min(end - at, WORDS - offset)
                piece = words[at : at + take]
                # The top half, sign-extended (= piece >> 32) by a widening copy: torch
                # 2.13's int64 shift on CPU costs some hundred times more than this copy.
                top = scratch[:take].copy_(halves[at : at + take])
                rows = table[:, offset : offset + take]
                out.append(torch.cat([_dot(torch, rows[:2], piece), _dot(torch, rows[2:], top)]))
                at += take
            return out

        if len(stretches) == 1:
            parts = stretch(stretches[0])
        else:
            parts = [p for done in _pool(ways).map(stretch, stretches) for p in done]
        chunks = [first // WORDS, (first + span - 1) // WORDS]
        weights = self._table(torch, words.device, "chunks", chunks[-1] + 1)
        picked = weights[chunks[0] : chunks[-1] + 1]
        return (torch.stack(parts) * picked).sum(dim=0)

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


def _stream(seed: bytes, n: int) -> Any:
    """Two rows of ``n`` random int64 from ``seed``; row j holds words 2i+j of SHAKE-256,
    so a longer stream starts with the shorter one (the chunk weights grow)."""
    import torch

    raw = bytearray(hashlib.shake_256(seed).digest(16 * n))
    return torch.frombuffer(raw, dtype=torch.int64).view(n, 2).t().contiguous()


if sys.byteorder != "little":  # the top halves are read as the odd 32-bit words
    raise ImportError("trainguard's fingerprints assume a little-endian machine")


# By process: a pool inherited through fork() has no threads (its tasks would wait forever).
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
MIN_CHUNKS_PER_THREAD = 8  # a stretch shorter than this is not worth a thread's hand-off


def _ways(torch: Any, words: Any, span: int) -> int:
    if words.device.type != "cpu":
        return 1  # one stream of kernels: the device runs them in parallel itself
    threads = int(torch.get_num_threads())
    return max(1, min(threads, span // (WORDS * MIN_CHUNKS_PER_THREAD)))


def _pool(ways: int) -> ThreadPoolExecutor:
    key = (os.getpid(), ways)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(ways, thread_name_prefix="trainguard-fp")
    return _POOLS[key]


def _dot(torch: Any, rows: Any, v: Any) -> Any:
    """``rows @ v`` modulo 2**64 (int64 wraps): CPU's ``mv`` reads ``v`` once for both
    rows; CUDA has no integer ``mv``, so elementwise products there."""
    if v.device.type == "cpu":
        return torch.mv(rows, v)
    return (rows * v).sum(dim=1)


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
