"""Ranks that should agree, and ranks that stopped.

Data-parallel ranks hold identical parameters after every step.  Every
``sync_every`` steps each rank's parameter fingerprint is gathered; ranks
outside the majority are named (TG1310).  A rank that dies stops writing to
its ledger stream: when a guard closes, streams that stopped behind it are
reported with their last step (TG1311).
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def compare_ranks(guard: Any) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (guard.rank, guard.step_index, guard._after.digest)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    digests = {rank: digest for rank, _, digest in gathered}
    counts = Counter(digests.values())
    top, n = counts.most_common(1)[0]
    if n == len(digests):
        return
    if guard.rank != 0:
        return  # one report per disagreement: rank 0 writes it
    if n > len(digests) / 2:
        odd = sorted(r for r, d in digests.items() if d != top)
        message = f"rank(s) {', '.join(map(str, odd))} hold different parameters from the other {n}"
    else:
        odd = sorted(digests)
        message = (
            "no majority: ranks "
            + ", ".join(f"{r}={d[:8]}" for r, d in sorted(digests.items()))
            + " all differ"
        )
    guard._alert("TG1310", message, ranks=odd, digests={str(r): d for r, d in digests.items()})


def check_ranks(guard: Any, failed: bool = False) -> None:
    """Report ranks whose ledger stream stopped before this one's.

    A rank without a run-end record that is behind us, or any such rank when
    our own training failed (a dead peer breaks the next collective), stopped.
    """
    last: dict[int, int] = {}
    ended: set[int] = set()
    for record in guard.ledger.records(guard.run_id):
        if record.stream < 0:
            continue
        if record.kind == "run-end":
            ended.add(record.stream)
        if record.step is not None:
            last[record.stream] = max(last.get(record.stream, -1), record.step)
    for rank in range(guard.world_size):
        if rank == guard.rank or rank in ended:
            continue
        step = last.get(rank)
        if failed or step is None or step < guard.step_index - 1:
            guard._alert(
                "TG1311",
                f"rank {rank} stopped reporting"
                + (f" after step {step}" if step is not None else " before step 0"),
                stopped_rank=rank,
                last_step=step,
            )
