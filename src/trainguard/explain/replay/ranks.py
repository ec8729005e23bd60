"""Replaying a data-parallel run: every rank at once, under gloo, as in training.

A data-parallel step all-reduces the gradients, so one rank's step cannot be
recomputed alone.  :func:`replay_ranks` starts one replay process per
recorded rank (``python -m trainguard.explain.replay.rank_worker``), joins them in a
gloo process group of the recorded world size on the CPU, and each replays
its own rank's stream through the entry point, which builds the model as
training did (``DistributedDataParallel`` included).

The ranks must run the same collectives in the same order, so inside a group
the replay engine asks :class:`Ranks` before each segment whether any rank's
checkpoint failed (then none replays it), steps every rank through the whole
segment even after a divergence, and stops at the same segment on every rank.

Which rank did it: at the first step any rank diverges, a rank whose own
checkpoint, batch, random state or weights before the step differ is where it
started; failing that, a rank whose loss differs (under FSDP a peer's edited
slice reaches every forward through the all-gather, so the loss comes second);
ranks that differ only after the all-reduce (gradient norm, update) received
it.  :func:`sources` names them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from trainguard.explain.replay.ledger import ReplayError
from trainguard.explain.replay.result import ReplayReport, report_from_dict

# Fields of a rank's own state before the step (its checkpoint, batch, random state and
# weights, or under FSDP its slice of them): a difference there is the rank's own.
OWN_FIELDS = ("file", "run", "params", "optimizer-state", "carried", "carried-ledger",
              "carried-step", "carried-schedule", "batch", "rng", "before")  # fmt: skip
# The loss is computed before the all-reduce too, and is the rank's own under DDP (its
# forward reads its own replica); under FSDP the forward reads every peer's slice
# (all-gathered), so a peer's edited slice changes it as well: it names the rank only
# when no rank's own state differs.
LOCAL_FIELDS = (*OWN_FIELDS, "loss")
GROUP_TIMEOUT_S = 120  # a rank that raised leaves the others waiting in a collective


def join_group(port: int, rank: int, world_size: int) -> None:
    """Join the loopback gloo group a replay rank process (rank_worker, the verifier's
    rank_server) shares with its peers."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )


class Ranks:
    """The replay process group, if any: agreement between ranks (a no-op alone)."""

    def __init__(self) -> None:
        self.distributed = False
        try:
            import torch.distributed as dist
        except ImportError:
            return
        self.distributed = bool(
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, plan: Sequence[tuple[int, int]]) -> None:
        """Every rank must replay the same segments (each saved its own checkpoints)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        plans: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(plans, list(plan))
        if any(p != plans[0] for p in plans):
            raise ReplayError(
                "the ranks' checkpoints cut the run into different segments "
                f"({'; '.join(f'rank {r}: {p}' for r, p in enumerate(plans))}): every rank "
                "must save its checkpoints at the same steps (guard.checkpoint on each rank)"
            )


def sources(reports: Sequence[ReplayReport]) -> tuple[int | None, list[int]]:
    """The first step any rank diverged at, and the ranks where the divergence began."""
    firsts = {r.rank: r.first_divergence for r in reports if r.first_divergence is not None}
    if not firsts:
        return None, []
    step = min(d.step for d in firsts.values())
    at = {rank: d for rank, d in firsts.items() if d.step == step}
    for fields in (OWN_FIELDS, LOCAL_FIELDS):
        named = sorted(rank for rank, d in at.items() if any(f.field in fields for f in d.fields))
        if named:
            return step, named
    return step, sorted(at)


def world_size(ledger: str, run_id: str) -> int:
    """The world size rank 0's run-start record gives."""
    from trainguard.ledger import open_ledger

    store = open_ledger(ledger, create=False)
    try:
        for record in store.records(run_id, 0):
            if record.kind == "run-start":
                world = record.payload.get("world_size")
                return world if isinstance(world, int) and world > 0 else 1
    finally:
        store.close()
    raise ReplayError(f"no run-start record for run {run_id!r} on stream 0")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replay_ranks(
    ledger: str, run_id: str, entry: str, world_size: int, *, timeout: float = 600.0, **options: Any
) -> list[ReplayReport]:
    """Replay every rank of ``run_id`` in a gloo group of ``world_size`` processes.

    ``entry`` is a ``module:function`` (each process imports it); ``options``
    are :func:`~trainguard.explain.replay.engine.replay`'s (``key`` as bytes).
    """
    if world_size < 1:
        raise ReplayError(f"world size {world_size}: nothing to replay")
    key = options.pop("key", None)
    port = _port()
    with tempfile.TemporaryDirectory(prefix="trainguard-replay-") as tmp:
        procs = []
        for rank in range(world_size):
            job = {
                "ledger": ledger,
                "run_id": run_id,
                "entry": entry,
                "rank": rank,
                "world_size": world_size,
                "port": port,
                "key": key.hex() if key else None,
                "options": options,
                "out": os.path.join(tmp, f"rank{rank}.json"),
            }
            with open(os.path.join(tmp, f"rank{rank}.err"), "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "trainguard.explain.replay.rank_worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job).encode())  # on stdin: not for `ps` to show the key
            proc.stdin.close()
            procs.append(proc)
        reports, errors = [], []
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with open(os.path.join(tmp, f"rank{rank}.err"), "rb") as fh:
                err = fh.read()[-300:].decode("utf-8", "replace")
            out = os.path.join(tmp, f"rank{rank}.json")
            if os.path.exists(out):
                with open(out, encoding="utf-8") as fh:
                    result = json.load(fh)
                if result.get("error"):
                    errors.append(f"rank {rank}: {result['error']}")
                else:
                    reports.append(report_from_dict(result["report"]))
            else:
                errors.append(f"rank {rank} exited {proc.returncode}: {err}")
    if errors:
        raise ReplayError("replaying the ranks failed: " + "; ".join(errors))
    return reports
