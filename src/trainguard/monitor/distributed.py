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
from dataclasses import dataclass, field
from typing import Any

from trainguard.monitor import ranks
from trainguard.monitor.calibration import rank_pace
from trainguard.monitor.exchange import all_gather_json
from trainguard.monitor.fingerprint import hyperparameters, optimizer_tensors
from trainguard.monitor.sharding import shards
from trainguard.monitor.watchdog import WAIT_NOTE_EVERY, WAITING_KIND

# How long a rank whose training failed waits for its peers to say so too,
# before it names those that did not as stopped.
FAILED_GRACE_SECONDS = 15.0
FAILED_KIND = "rank-failed"
# A blocked peer's rank-waiting note counts as a sign of life for this long: two of
# the watchdog's note intervals, so one late note is tolerated and a rank that
# died after its last note is not.
NOTE_FRESH_SECONDS = 2 * WAIT_NOTE_EVERY


def rank_report(guard: Any) -> dict[str, Any]:
    """What this rank holds and runs, for the other ranks to compare."""
    params = guard.fp.fingerprint(guard.named_params)
    held = dict(params.per_tensor)
    # Every optimizer's state and settings (several optimizers: monitor/optimizers.py).
    optimizers = guard.optimizers.all
    for i, opt in enumerate(optimizers):
        moments = guard.fp.fingerprint(optimizer_tensors(opt))
        prefix = "optimizer " if i == 0 else f"optimizer#{i} "
        held.update({prefix + label: d for label, d in moments.per_tensor})
    settings = [hyperparameters(o) for o in optimizers]
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
        "hyperparameters": ranks.digest_of(settings[0] if len(settings) == 1 else settings),
        "code": ranks.code_digests(guard.optimizer),
        "shards": held,
        "cover": cover,
        "pace": rank_pace(guard.checks),  # torch against plain code (calibration.py)
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

    Except those seen alive: a survivor still blocked in a collective (gloo's
    ring puts only the dead rank's neighbours in error at once; the others
    wait for the process group's timeout) has a watchdog that writes a
    ``rank-waiting`` note every few seconds (watchdog.py).  A silent rank with a
    note written during our grace period, recently enough, waits behind the
    dead rank: TG1314, with where it waits, not TG1311.  A dead rank writes
    nothing, so only a positive sign of life spares a rank.
    """
    if failed:
        guard._record(FAILED_KIND, {"step": guard.step_index})
    deadline = time.monotonic() + FAILED_GRACE_SECONDS
    streams = _streams(guard)
    seen = dict(streams.notes)  # notes older than our grace period prove nothing
    alive: dict[int, tuple[float, dict[str, Any]]] = {}  # rank -> (when seen, its note)
    while True:
        now = time.monotonic()
        for rank, count in streams.notes.items():
            if count > seen.get(rank, 0):
                seen[rank] = count
                alive[rank] = (now, streams.note[rank])
        silent = [
            r
            for r in range(guard.world_size)
            if r != guard.rank
            and r not in streams.ended
            # Behind by more than the step a peer may still be writing; a run closed
            # before its first step has nobody behind (every rank used to wait for
            # the others' run-end, written after this wait, and name them all).
            and (failed or streams.last.get(r, -1) < guard.step_index - 1)
        ]
        blocked = {r for r in silent if r in alive and now - alive[r][0] <= NOTE_FRESH_SECONDS}
        if not set(silent) - blocked or now > deadline:
            break
        time.sleep(0.25)
        streams = _streams(guard)
    stopped = [r for r in silent if r not in blocked]
    for rank in stopped:
        step = streams.last.get(rank)
        guard._alert(
            "TG1311",
            f"rank {rank} stopped reporting"
            + (f" after step {step}" if step is not None else " before step 0"),
            stopped_rank=rank,
            last_step=step,
            ranks=[rank],  # what the alert is about: two stopped ranks are two alerts (sink.py)
        )
    for rank in sorted(blocked):
        note = alive[rank][1]
        behind = f"behind rank(s) {', '.join(map(str, stopped))}" if stopped else "behind its peers"
        guard._alert(
            "TG1314",
            f"rank {rank} is alive but blocked in torch.distributed "
            f"{note.get('collective')} {behind} (its last step {note.get('last_step')})",
            blocked_rank=rank,
            ranks=[rank],
            collective=note.get("collective"),
            last_step=note.get("last_step"),
            waiting_seconds=note.get("seconds"),
            behind=stopped,
        )


@dataclass
class _Streams:
    last: dict[int, int] = field(default_factory=dict)  # each stream's last step
    ended: set[int] = field(default_factory=set)  # streams that ended or said they failed
    notes: dict[int, int] = field(default_factory=dict)  # rank-waiting notes per stream
    note: dict[int, dict[str, Any]] = field(default_factory=dict)  # the latest of them


def _streams(guard: Any) -> _Streams:
    found = _Streams()
    for record in guard.ledger.records(guard.run_id):
        stream = record.stream
        if stream < 0:
            continue
        if record.kind in ("run-end", FAILED_KIND):
            found.ended.add(stream)
        elif record.kind == WAITING_KIND and isinstance(record.payload, dict):
            found.notes[stream] = found.notes.get(stream, 0) + 1
            found.note[stream] = record.payload
        if record.step is not None and record.kind == "step":
            found.last[stream] = max(found.last.get(stream, -1), record.step)
    return found


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
