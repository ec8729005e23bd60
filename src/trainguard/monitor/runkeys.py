"""Every rank's run key id, gathered at start, for each rank's run-start record.

A verifier takes a rank's word (an alert that a peer died) only when that
rank's run key is anchored (ledger/anchor.py).  Rank 0's final run head
vouches for every rank, but a run whose rank 0 died never writes one; so each
rank's run-start names the key id of every rank (``run_keys``, by rank), and
a head signed by rank 0's key over its run-start vouches for the survivors:
one pinned rank anchors all.  The ids travel as bounded JSON (monitor/
exchange.py), never pickled; one rank's id that cannot be read is ``None``.
"""

from __future__ import annotations

from typing import Any

from trainguard.ledger.chain import is_hex_digest
from trainguard.monitor.exchange import all_gather_json


def gather_run_keys(key_id: str | None, world_size: int) -> list[str | None] | None:
    """Every rank's run key id in rank order; None for a single process.

    Called by every rank at the same point (guard start-up), like the shared key's
    broadcast (monitor/setup.py), whether this rank signs or not, so that the
    collective always matches.
    """
    if world_size <= 1:
        return [key_id] if key_id is not None else None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    exchanged = all_gather_json({"key_id": key_id})
    ids: list[str | None] = []
    for report in exchanged.reports:
        value: Any = report.get("key_id") if report is not None else None
        ids.append(value if is_hex_digest(value) else None)
    return ids if any(i is not None for i in ids) else None
