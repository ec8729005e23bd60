"""What a guard writes to the ledger, and when its heads are signed.

One stream per rank (``stream`` = rank); rank 0 also writes the run's summary
to stream -1 at close.  With a signing key, this rank's head is signed every
``sign_every`` steps and at close, so a stream cut short or rewritten shows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from trainguard.monitor.setup import open_store

if TYPE_CHECKING:
    from trainguard.ledger import Ledger


class Recorder:
    def __init__(
        self,
        ledger: Ledger | str | os.PathLike[str] | None,
        run_id: str,
        rank: int,
        sign_key: Any = None,
        sign_every: int = 100,
    ) -> None:
        self._owns = isinstance(ledger, (str, os.PathLike))
        self.ledger = open_store(ledger)
        self.run_id = run_id
        self.rank = rank
        self.sign_key = sign_key
        self.sign_every = sign_every

    @classmethod
    def for_run(cls, options: Any, run_id: str, rank: int) -> Recorder:
        """The recorder a guard with these WatchOptions writes through."""
        return cls(options.ledger, run_id, rank, options.sign_key, options.sign_every)

    def append(self, kind: str, payload: dict[str, Any], step: int) -> None:
        if self.ledger is not None:
            self.ledger.append(self.run_id, kind, payload, step=step, stream=self.rank)

    def step_done(self, step: int) -> None:
        """After step ``step``'s record: sign the head when it is due."""
        if (
            self.sign_key is not None
            and self.ledger is not None
            and (step + 1) % self.sign_every == 0
        ):
            self.ledger.sign_head(self.run_id, self.rank, self.sign_key)

    def finish(self, steps: int, world_size: int) -> None:
        """After the run-end record: sign the final heads and close a ledger we opened."""
        if self.ledger is None:
            return
        if self.sign_key is not None:
            self.ledger.sign_head(self.run_id, self.rank, self.sign_key)
            if self.rank == 0:
                # The run head names every rank's head: cutting any stream short shows.
                self.ledger.append(
                    self.run_id,
                    "run-summary",
                    {"world_size": world_size, "steps": steps},
                    step=steps,
                    stream=-1,
                )
                self.ledger.sign_head(self.run_id, -1, self.sign_key)
        if self._owns:
            self.ledger.close()


def run_start(guard: Any, environment: Any, conditions: Any) -> dict[str, Any]:
    """The run-start record: what `trainguard replay` and `report` compare against."""
    import torch

    opts = guard.options
    return {
        "key_id": guard.fp.digest_bytes(b"key-id"),
        "every": opts.every,
        "budget": opts.budget,
        # False: grad_norm in step records is what the loop passed (replay skips it).
        "measure_grad_norm": opts.measure_grad_norm,
        "param_names": guard.tamper.after.names(),
        "optimizer_names": guard.tamper.opt_names,
        "state": guard.tamper.state_digests(),
        "conditions": conditions,
        "world_size": guard.world_size,
        "optimizer": type(guard.optimizer).__name__,
        "params": sum(p.numel() for _, p in guard.named_params),
        "identity": guard.identity.snapshot,
        "initial_seed": guard.seeds.initial_seed,
        "hyperparameters": guard.hyper.groups,
        "torch": torch.__version__,
        "pid": os.getpid(),
        "environment": environment,  # the start-up check, or None if not asked for
    }


def step_payload(guard: Any, end: Any, batch: Any) -> dict[str, Any]:
    """A step record: the fingerprints the checks took, then what the step did."""
    record = dict(guard._pending or {})
    if batch is not None and "plain" in record:
        record["plain"] = {**record["plain"], "batch": batch.plain}
    record.update(
        {
            "loss": end.loss,
            "grad_norm": end.grad_norm,
            "step_time": end.seconds,
            "batch": batch.digest if batch is not None else None,
            "rng": guard.seeds.digests,
            "lr": guard.hyper.lrs(),
            "rank": guard.rank,
            "world_size": guard.world_size,
        }
    )
    return record
