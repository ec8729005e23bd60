"""Keyed, exact fingerprints of tensors, computed on the tensors' own device.

Each tensor's bits are read as integers and reduced twice on its device: a
plain wrapping sum and a sum after XOR with a secret per-run key.  A change of
a single bit anywhere (one ulp of one weight) changes the plain sum; without
the key, code that alters weights cannot predict how the keyed sum moves, so
it cannot compensate.  Only two integers per tensor leave the device; the
digest that goes to the ledger is a keyed BLAKE2b over those integers, the
tensor names, shapes and dtypes.

Cost: about three passes over the tensor's memory (sum, XOR, sum); no copy of
the parameters is kept.

Sharded tensors (FSDP2's DTensors) are read where they live: each rank sums
its own slice, of whatever size (an empty one included), and names it by the
slice (``0.weight[4:8]``, see sharding.py); nothing is gathered.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.monitor.sharding import is_dtensor, local, shard, state_owner

_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}
_CHUNK = 1 << 18  # int64 words per chunk: 2 MiB, inside the cache of most CPUs


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
        self._xor = int.from_bytes(self.key[:8], "little", signed=True)
        self._masks: dict[tuple[Any, str], Any] = {}

    def _mask(self, torch: Any, device: Any, int_dtype: str) -> Any:
        key = (device, int_dtype)
        if key not in self._masks:
            bits = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}[int_dtype]
            value = self._xor & ((1 << bits) - 1)
            if value >= 1 << (bits - 1):
                value -= 1 << bits
            self._masks[key] = torch.tensor(value, dtype=getattr(torch, int_dtype), device=device)
        return self._masks[key]

    def sums(self, tensors: Sequence[Any]) -> list[tuple[int, int]]:
        """(plain, keyed) integer sums of each tensor's bits."""
        import torch

        out = []
        for t in tensors:
            data = local(t).detach()
            if data.numel() == 0:  # an empty shard: nothing to read, nothing to sync
                out.append(torch.zeros(2, dtype=torch.int64, device=data.device))
                continue
            if data.is_complex():
                data = torch.view_as_real(data)
            if not data.is_contiguous():
                data = data.contiguous()
            if data.dtype == torch.bool:
                data = data.view(torch.uint8)
            int_dtype = _INT_VIEW.get(data.element_size(), "int8")
            if data.element_size() not in _INT_VIEW:  # an odd item size: read it byte by byte
                data = data.reshape(-1).view(torch.uint8)
            bits = data.view(getattr(torch, int_dtype)).reshape(-1)
            if bits.numel() * bits.element_size() % 8 == 0:
                # Reduced as 64-bit words: summing int64 is vectorised, widening
                # int32 to int64 first is several times slower.  The word size follows
                # from the byte count alone, so equal bytes give equal sums wherever
                # they sit: a view at an odd address (a shard inside FSDP's padded
                # storage) is copied to an aligned one rather than summed differently.
                if bits.data_ptr() % 8:
                    bits = bits.clone()
                int_dtype = "int64"
                bits = bits.view(torch.uint8).view(torch.int64)
            mask = self._mask(torch, bits.device, int_dtype)
            if bits.numel() <= _CHUNK:
                keyed = torch.bitwise_xor(bits, mask).sum(dtype=torch.int64)
                out.append(torch.stack([bits.sum(dtype=torch.int64), keyed]))
                continue
            # Chunks small enough to stay in cache: the XOR'd copy never goes to
            # memory, so a fingerprint costs about one pass over the tensor.
            scratch = torch.empty(_CHUNK, dtype=bits.dtype, device=bits.device)
            parts = []
            for start in range(0, bits.numel(), _CHUNK):
                chunk = bits[start : start + _CHUNK]
                tmp = scratch[: chunk.numel()]
                torch.bitwise_xor(chunk, mask, out=tmp)
                parts.append(
                    torch.stack([chunk.sum(dtype=torch.int64), tmp.sum(dtype=torch.int64)])
                )
            out.append(torch.stack(parts).sum(dim=0))
        if not out:
            return []
        # One transfer for all tensors: a device sync per tensor would cost more
        # than the reductions on a GPU.
        pairs = torch.stack([o.to("cpu") for o in out]).tolist()
        return [(int(a), int(b)) for a, b in pairs]

    def fingerprint(self, named: Iterable[tuple[str, Any]]) -> Fingerprint:
        """Digests per tensor (per local shard, named by its slice) and for the group.

        A tensor this rank holds whole hashes as ``name|shape|dtype|sums``; a
        shard as ``name[slice]|global shape|dtype|sums``, so equal labels on two
        ranks mean the same elements of the same tensor.
        """
        items = [shard(n, t) for n, t in named if t is not None]
        sums = self.sums([s.local for s in items])
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
