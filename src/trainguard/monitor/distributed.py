"""Ranks that must agree, and ranks that stopped.

Every ``sync_every`` steps each rank sends a small report (exchange.py: JSON,
never pickle) and every rank judges all of them the same way (ranks.py):

* bytes that must be equal: each local shard's digest under its label
  (sharding.py).  A label held by several ranks (DDP, the replica groups of
  HSDP, ZeRO's replicated parameters, FSDP's replicated step counters) must
  carry one digest; ranks outside the majority are named with the shards
  (TG1310).  A pure shard has no replica: it is checked on its own rank at every
  step (TG1301/TG1302/TG1306) and, here, by the composed model below;
* what every rank must share whatever the sharding: the step counter, the
  world size, the run key, the optimizer's hyper-parameters (TG1303) and the
  code of the training machinery (TG1304: a patch on some ranks only, such as
  one that arms on large jobs);
* the composed model: the shards of each parameter must cover it exactly, and
  a whole-model digest over every (label, digest) pair, in an order that does
  not depend on which rank holds what, goes to the ledger (``rank-sync``).

The lowest rank that no finding names writes the alerts, so a rank cannot hide
a finding about itself.  A rank that dies stops writing to its ledger stream:
when a guard closes, streams that stopped behind it are reported with their
last step (TG1311).
"""

from __future__ import annotations

import time
from typing import Any

from trainguard.monitor import ranks
from trainguard.monitor.exchange import all_gather_json
from trainguard.monitor.fingerprint import hyperparameters, optimizer_tensors
from trainguard.monitor.sharding import shards

# How long a rank whose training failed waits for its peers to say so too,
# before it names those that did not as stopped.
FAILED_GRACE_SECONDS = 15.0
FAILED_KIND = "rank-failed"


def rank_report(guard: Any) -> dict[str, Any]:
    """What this rank holds and runs, for the other ranks to compare."""
    params = guard.fp.fingerprint(guard.named_params)
    moments = guard.fp.fingerprint(optimizer_tensors(guard.optimizer))
    held = dict(params.per_tensor)
    held.update({"optimizer " + label: d for label, d in moments.per_tensor})
    cover = {
        s.label: [s.name, int(s.local.numel()), _numel(s.global_shape)]
        for s in shards(guard.named_params)
        if s.sharded
    }
    return {
        "rank": guard.rank,
        "step": guard.step_index,
        "world": guard.world_size,
        "key": guard.fp.digest_bytes(b"key-id"),
        "hyperparameters": ranks.digest_of(hyperparameters(guard.optimizer)),
        "code": ranks.code_digests(guard.optimizer),
        "shards": held,
        "cover": cover,
    }


def compare_ranks(guard: Any) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    exchanged = all_gather_json(rank_report(guard))
    guard.sync_bytes = exchanged.received  # the collective traffic of this comparison
    verdict = ranks.judge(exchanged.reports, guard.fp.key)
    if guard.rank != verdict.reporter:
        return  # every rank reaches the same verdict; one writes it
    for finding in verdict.findings:
        guard._alert(finding.rule, finding.message, **finding.evidence)
    guard._record(
        "rank-sync",
        {
            "composed": verdict.composed,
            "shards": verdict.shard_count,
            "replicated": verdict.replicated,
            "bytes": exchanged.received,
        },
    )


def check_ranks(guard: Any, failed: bool = False) -> None:
    """Report ranks whose ledger stream stopped before this one's.

    A rank without a run-end record that is behind us stopped.  Peers write
    their last records a moment apart (the ledger serialises many writers), so
    a rank that looks behind gets a grace period to catch up.  When our own
    training failed (a dead peer breaks the next collective) we say so in the
    ledger first: the ranks that then neither end nor say they failed are the
    ones that stopped.
    """
    if failed:
        guard._record(FAILED_KIND, {"step": guard.step_index})
    deadline = time.monotonic() + FAILED_GRACE_SECONDS
    while True:
        last, ended = _streams(guard)
        silent = [
            r
            for r in range(guard.world_size)
            if r != guard.rank
            and r not in ended
            and (failed or last.get(r) is None or last[r] < guard.step_index - 1)
        ]
        if not silent or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    for rank in silent:
        step = last.get(rank)
        guard._alert(
            "TG1311",
            f"rank {rank} stopped reporting"
            + (f" after step {step}" if step is not None else " before step 0"),
            stopped_rank=rank,
            last_step=step,
        )


def _streams(guard: Any) -> tuple[dict[int, int], set[int]]:
    """Each stream's last step, and the streams that ended or said they failed."""
    last: dict[int, int] = {}
    ended: set[int] = set()
    for record in guard.ledger.records(guard.run_id):
        if record.stream < 0:
            continue
        if record.kind in ("run-end", FAILED_KIND):
            ended.add(record.stream)
        if record.step is not None and record.kind == "step":
            last[record.stream] = max(last.get(record.stream, -1), record.step)
    return last, ended


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
