"""What a guard writes to the ledger, and when its heads are signed.

One stream per rank (``stream`` = rank); rank 0 also writes the run's summary
to stream -1 at close, with a signed run head naming every rank's stream.
Signing is on by default: each rank makes an Ed25519 run key at start, kept
in memory only, whose public half goes into its run-start record
(ledger/runkey.py); this rank's head is signed right after its run-start (which
names every rank's key id, monitor/runkeys.py), every ``sign_every`` steps and
at close, so a stream cut short or rewritten afterwards shows, and once the
process is gone no one can sign a new head.

Batched step records (budget mode, one rank, a ledger that writes several records in
one transaction: SQLite): a step record is made (payload frozen into JSON text, wall
time taken) at its step, held in memory (normalised into its canonical text when the
batch is written), and written with the others held
in one transaction every ``BATCH_RECORDS`` records or ``BATCH_SECONDS``, and before
any other record (an alert, a checkpoint, the run-end), before a head is signed, and
at close.  The chain and the signed heads are the same as one append each.  A killed
process loses the held step records (at most ``BATCH_RECORDS - 1``, or those of the
last ``BATCH_SECONDS``): its stream ends at the last written step, as if it had died
those steps earlier; ``ledger verify`` reads it as any stream that stops without a
run-end.  Distributed runs write each record at once (peers read each other's last
step from the ledger).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from trainguard.monitor import clock
from trainguard.monitor.fingerprint import FINGERPRINT_VERSION
from trainguard.monitor.forwards import declared_names
from trainguard.monitor.runkeys import gather_run_keys
from trainguard.monitor.setup import open_store, rank_world

if TYPE_CHECKING:
    from trainguard.ledger import Ledger
    from trainguard.signing.keys import PrivateKey

log = logging.getLogger("trainguard.monitor")

# How long rank 0 waits at close for every rank's stream to exist before its
# run head names them (they start together; this only bounds a pathological case).
STREAMS_GRACE_SECONDS = 10.0
# Step records held before one transaction writes them (batched mode), and the longest
# a held record waits: what a killed process can lose.
BATCH_RECORDS = 32
BATCH_SECONDS = 1.0
# A head is signed at the first step end this long after the last one, whatever
# sign_every says (~50 us each): a killed process leaves at most these seconds unsigned.
SIGN_SECONDS = 5.0


class Recorder:
    def __init__(
        self,
        ledger: Ledger | str | os.PathLike[str] | None,
        run_id: str,
        rank: int,
        sign_key: Any = None,
        sign_every: int = 100,
        run_key_out: str | os.PathLike[str] | None = None,
        world_size: int = 1,
        batch: bool = False,
        anchors: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        self._owns = isinstance(ledger, (str, os.PathLike))
        self.ledger = open_store(ledger)
        # Step records made and not yet written (batched mode), oldest first.
        self.batched = bool(batch) and bool(getattr(self.ledger, "batches_appends", False))
        self._held: list[tuple[str, int | None, float, Any]] = []
        self._lock = threading.Lock()  # the watchdog's thread appends too
        self.run_id = run_id
        self.rank = rank
        self.sign_every = sign_every
        # Heads are also signed by time, so a process that dies without closing (os._exit,
        # SIGKILL) leaves at most the last SIGN_SECONDS of its stream unsigned.
        self._signed_at = clock.now()
        self.sign_seconds = SIGN_SECONDS
        self.finished = False  # finish() is done: the run-end and its heads are written
        self.sign_key: PrivateKey | None = None
        self.key_id: str | None = None
        if self.ledger is not None and sign_key is not False:
            self.sign_key = _signing_key(sign_key, run_key_out, rank, world_size)
            from trainguard.ledger.runkey import run_key_entry

            self.key_id = run_key_entry(self.sign_key)["key_id"]
        location = getattr(self.ledger, "location", None)
        if isinstance(location, str) and location and rank == 0:
            # Only a store verify can open by that location: not the in-memory capture
            # of a replay (hundreds of guards a minute), not a custom object without one.
            _anchor(anchors, run_id, location, self.key_id)
        if self.key_id is not None:
            # Logged for pinning off the host (--expect-key-id), the strong form of the
            # anchor file's pin: it catches a stream rewritten whole with a new key.
            log.info(
                "trainguard: run %s rank %d: ledger run key id %s "
                "(pin it: trainguard ledger verify %s --expect-key-id %s)",
                run_id,
                rank,
                self.key_id,
                run_id,
                self.key_id[:16],
            )

    @classmethod
    def for_run(cls, options: Any, run_id: str, rank: int) -> Recorder:
        """The recorder a guard with these WatchOptions writes through."""
        _, world_size = rank_world(options.rank, options.world_size)
        return cls(
            options.ledger,
            run_id,
            rank,
            options.sign_key,
            options.sign_every,
            options.run_key_out,
            world_size,
            batch=options.budget is not None and world_size == 1,
            anchors=options.anchors,
        )

    def run_key(self) -> dict[str, Any] | None:
        """The run-start record's ``run_key``: the public half, or None when unsigned."""
        if self.sign_key is None:
            return None
        from trainguard.ledger.runkey import run_key_entry

        return run_key_entry(self.sign_key)

    def append(self, kind: str, payload: dict[str, Any], step: int) -> None:
        if self.ledger is None:
            return
        if self.batched and kind == "step":
            from trainguard.ledger.chain import freeze_payload

            # Frozen now (one JSON pass), normalised with the batch when it is written:
            # the round trip and the canonical text at every step were a fixed cost.
            made = (kind, step, time.time(), freeze_payload(payload))
            with self._lock:
                self._held.append(made)
                due = len(self._held) >= BATCH_RECORDS or made[2] - self._held[0][2] >= (
                    BATCH_SECONDS
                )
                if due:
                    self._write_held()
            return
        with self._lock:
            self._write_held()  # in order: the held steps come before this record
            self.ledger.append(self.run_id, kind, payload, step=step, stream=self.rank)
            if kind == "run-start" and self.sign_key is not None:
                # Signed at once: the run-start names every rank's key id (run_keys), and
                # only a head of this key makes that list count, also when this rank dies
                # before its first periodic head (ledger/anchor.py).
                self.ledger.sign_head(self.run_id, self.rank, self.sign_key)

    def _write_held(self) -> None:
        """Write the held step records in one transaction (the lock is held)."""
        if not self._held or self.ledger is None:
            return
        from trainguard.ledger.chain import normalise_frozen

        # Normalised before any is taken out: one that fails leaves them all held.
        normal = [(k, s, w, normalise_frozen(first)) for k, s, w, first in self._held]
        self._held = []
        self.ledger.append_many(self.run_id, self.rank, normal)  # type: ignore[attr-defined]

    def flush(self) -> None:
        """Write the held step records now."""
        with self._lock:
            self._write_held()

    def step_done(self, step: int) -> None:
        """After step ``step``'s record: sign the head when it is due."""
        if self.sign_key is None or self.ledger is None:
            return
        now = clock.now()
        if (step + 1) % self.sign_every == 0 or now - self._signed_at >= self.sign_seconds:
            with self._lock:
                self._write_held()  # the head names the last step record
                self.ledger.sign_head(self.run_id, self.rank, self.sign_key)
            self._signed_at = now

    def finish(self, steps: int, world_size: int) -> None:
        """After the run-end record: sign the final heads and close a ledger we opened."""
        if self.ledger is None:
            self.finished = True
            return
        self.flush()
        if self.sign_key is not None:
            self.ledger.sign_head(self.run_id, self.rank, self.sign_key)
            if self.rank == 0:
                self._wait_for_streams(world_size)
                # The run head names every rank's head: a deleted stream, or one cut
                # back behind what it names, shows.
                self.ledger.append(
                    self.run_id,
                    "run-summary",
                    {"world_size": world_size, "steps": steps},
                    step=steps,
                    stream=-1,
                )
                self.ledger.sign_head(self.run_id, -1, self.sign_key)
        # The key is not needed any more: after this no one can sign for this run.
        self.sign_key = None
        if self._owns:
            self.ledger.close()
        self.finished = True

    def _wait_for_streams(self, world_size: int) -> None:
        streams = getattr(self.ledger, "streams", None)
        if world_size <= 1 or not callable(streams):
            return
        deadline = time.monotonic() + STREAMS_GRACE_SECONDS
        while time.monotonic() < deadline:
            if len([s for s in streams(self.run_id) if s >= 0]) >= world_size:
                return
            time.sleep(0.1)


def _anchor(
    anchors: str | os.PathLike[str] | bool | None, run_id: str, location: str, key_id: str | None
) -> None:
    """Append rank 0's anchor line (ledger/anchorfile.py); a failure only warns: training
    goes on, and ledger verify then says the run has no anchor."""
    from pathlib import Path

    from trainguard.ledger.anchorfile import default_path, write_anchor

    if anchors is False:
        return
    path = default_path() if anchors is None or anchors is True else Path(os.fspath(anchors))
    if path is None:
        return
    try:
        write_anchor(path, run_id, location, key_id)
    except (OSError, ValueError) as exc:
        log.warning("trainguard: run %s: could not write its anchor to %s: %s", run_id, path, exc)


def _signing_key(
    sign_key: Any, out: str | os.PathLike[str] | None, rank: int, world_size: int
) -> PrivateKey:
    """The user's key, or a fresh run key (written to ``out`` when asked)."""
    if sign_key is not None:
        from trainguard.signing.keys import private_key_from

        return private_key_from(sign_key)
    from trainguard.ledger.runkey import new_run_key

    key = new_run_key()
    if out is not None:
        from trainguard.signing.keys import write_private_key

        path = os.fspath(out)
        if "{rank}" in path:
            path = path.replace("{rank}", str(rank))
        elif world_size > 1:
            path = f"{path}.rank{rank}"
        write_private_key(path, key)
    return key


def run_start(guard: Any, environment: Any, conditions: Any) -> dict[str, Any]:
    """The run-start record: what `trainguard replay` and `report` compare against."""
    import torch

    opts = guard.options
    return {
        "key_id": guard.fp.digest_bytes(b"key-id"),
        # The fingerprints' math: digests of another version are never compared.
        "fingerprint_version": FINGERPRINT_VERSION,
        # The public half of the key that signs this stream's heads (ledger/runkey.py).
        "run_key": guard.recorder.run_key(),
        # Every rank's key id (a collective: every rank builds this record at start), so
        # rank 0's signed run-start vouches for its peers even if rank 0 dies.
        "run_keys": gather_run_keys(guard.recorder.key_id, guard.world_size),
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
    # What the loop declared changing on purpose at this step, as data (replay's schedule
    # witness holds a checkpoint's schedule to a fresh one only up to such a change):
    # guard.step(changed=...)'s names, and the hyper-parameter keys it set (TG1316).
    changed = sorted(declared_names(end.declared_changes))
    if changed:
        record["changed"] = changed
    if getattr(guard.hyper, "changed_keys", None):
        record["hyper_changed"] = list(guard.hyper.changed_keys)
    return record
