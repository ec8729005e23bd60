"""Exchanging small reports between ranks without trusting them.

``torch.distributed.all_gather_object`` unpickles what every peer sends: one
compromised rank would run code in every other.  Reports here travel as
bounded JSON bytes in two ``all_gather`` calls (the lengths, then the padded
bytes) and are parsed with ``json``; a report that is too long or unreadable
is ``None``, and the caller names the rank that sent it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# A rank report holds one 16-character digest per local tensor shard and the
# shard's label: 4 MiB is room for about 50,000 shards per rank.
MAX_REPORT_BYTES = 4 << 20


@dataclass
class Exchanged:
    reports: list[dict[str, Any] | None]  # by rank; None: unreadable or over the bound
    sent: int  # bytes this rank put on the wire
    received: int  # bytes this rank received (its share of the collective traffic)


def _device(dist: Any) -> Any:
    """Where the collective's tensors must live: the GPU for NCCL, else the CPU."""
    import torch

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(report: dict[str, Any]) -> Exchanged:
    """Every rank's ``report`` (a JSON-able dict), in rank order, on every rank."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    device = _device(dist)
    data = json.dumps(report, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_REPORT_BYTES:
        data = b"!"  # over the bound: sent as unreadable so that peers name us
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    # A peer that claims more than the bound is cut to it (and fails to parse):
    # the padding each rank allocates stays bounded whatever a peer claims.
    width = max(1, min(MAX_REPORT_BYTES, max(lengths)))
    mine = torch.zeros(width, dtype=torch.uint8, device=device)
    mine[: min(width, len(data))] = torch.frombuffer(bytearray(data[:width]), dtype=torch.uint8)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    reports: list[dict[str, Any] | None] = []
    for n, t in zip(lengths, gathered, strict=True):
        reports.append(_parse(bytes(t[: max(0, min(n, width))].cpu().tolist()), n, width))
    return Exchanged(reports, sent=8 + width, received=world * (8 + width))


def _parse(raw: bytes, claimed: int, width: int) -> dict[str, Any] | None:
    if claimed > width or claimed <= 0:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
