"""The end of a signed run: every stream that started must have ended, under a signature.

A hash chain and its signed heads vouch for what comes *before* the last
head; they say nothing about records cut off after it, so a stream cut back
to an earlier signed head looks intact to them.  A run that ``watch`` signed
(a run key in its run-start records, ledger/runkey.py) therefore has to show
its own end:

* each rank's stream that started has a ``run-end`` record, followed by a
  head signed by that stream's run key as its very last record (TG1211,
  TG1212);
* the run stream (-1) ends with rank 0's ``run-summary`` and a run head signed
  by rank 0's key, naming every rank's stream (TG1212), and every rank the
  run-start records count is there (TG1202);
* a rank that died is no failure when a survivor whose own stream closed
  under its signature reported it stopped (TG1311, or blocked behind a dead
  one: TG1314) at a step the dead rank's stream still reaches: that is
  explained at medium severity.

This module only judges the facts the verifier gathered while it read the
records (:class:`EndState`); it reads no ledger itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainguard.findings import Severity
from trainguard.ledger.chain import RUN_STREAM
from trainguard.ledger.runkey import key_id_matches

# The monitor's alerts that a peer stopped (TG1311) or was left blocked in a collective
# behind a dead one (TG1314, then ended by the process group's timeout or the
# launcher), with the evidence key that names the rank.
STOPPED_RULES = {"TG1311": "stopped_rank", "TG1314": "blocked_rank"}

Emit = Callable[..., None]


@dataclass
class EndState:
    """What one stream's records said about its start and its end."""

    started: bool = False  # seq 0 is a run-start record
    key_state: str = "absent"  # the run-start's run key: absent, off, bad or ok
    key_id: str | None = None
    world: int = 0  # the world size the run-start or run-summary gives
    run_end: int | None = None  # seq of the run-end (rank) or run-summary (run stream)
    last_seq: int = -1
    last_step: int | None = None
    head_ok: int = -1  # seq of the last head verified with the stream's key, matching
    listed: frozenset[int] | None = None  # the run stream's last verified head names these
    # rank -> (the last step it reported, the seq of the alert saying so)
    stopped: dict[int, tuple[int | None, int]] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        """It ended and its last record is a head verified with its key."""
        return self.run_end is not None and self.head_ok == self.last_seq

    def observe(self, kind: str, seq: int, step: int | None, payload: dict[str, Any]) -> None:
        if kind == "run-start" and seq == 0:
            self.started = True
            self.world = max(self.world, _count(payload.get("world_size")))
        elif kind in ("run-end", "run-summary"):
            self.run_end = seq
            self.world = max(self.world, _count(payload.get("world_size")))
        elif kind == "step" and step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        elif kind == "alert" and payload.get("rule") in STOPPED_RULES:
            evidence = payload.get("evidence")
            if isinstance(evidence, dict):
                rank = evidence.get(STOPPED_RULES[str(payload["rule"])])
                last = evidence.get("last_step")
                if isinstance(rank, int) and not isinstance(rank, bool):
                    self.stopped.setdefault(rank, (last if isinstance(last, int) else None, seq))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _signed_part(st: EndState) -> str:
    if st.head_ok >= 0 and st.head_ok == st.last_seq:
        return f"it ends at a signed head (seq {st.head_ok}), as a stream cut back to one would"
    if st.head_ok >= 0:
        return f"records after its last signed head (seq {st.head_ok}) are not authenticated"
    return "none of its records is covered by a signed head"


def check_ends(
    streams: dict[int, EndState],
    emit: Emit,
    *,
    pinned: bool,
    live: bool,
    expected: list[str] | None,
    reported: set[int],
) -> None:
    """Emit the end-of-run findings; ``reported`` are streams already found deleted."""
    ranks = {n: s for n, s in streams.items() if n != RUN_STREAM}
    run = streams.get(RUN_STREAM)
    # Rank 0 writes the run-summary only when it signs: a run stream that holds one
    # was signed, even if every rank stream is gone.
    keyed = any(s.key_state in ("ok", "bad") for s in ranks.values()) or (
        run is not None and run.run_end is not None
    )
    if expected is not None:
        _check_pins(ranks, run, emit, expected)
    # Signed or not, the ranks that watch's records count (the run-start of each rank's
    # stream, rank 0's run-summary) must be there.
    counts = [s.world for s in ranks.values() if s.started]
    world = max([*counts, run.world if run is not None and run.run_end is not None else 0])
    for n in sorted(set(range(world)) - set(ranks) - reported):
        emit(
            "TG1202",
            n,
            0,
            f"the run's records say it had {world} ranks, but stream {n} has no records: "
            "it was deleted",
        )
    if not keyed and not pinned:
        if expected is None:
            off = any(s.key_state == "off" for s in ranks.values())
            why = (
                "it was written with watch(sign_key=False)"
                if off
                else "a ledger from before signing, or one whose run-start records were "
                "rewritten to drop their keys"
            )
            emit(
                "TG1210",
                RUN_STREAM,
                None,
                "the run is UNSIGNED: no run key and no key given, so nothing authenticates "
                f"its records and a rewrite of the whole run would verify ({why}); pin its "
                "key with --expect-key-id or --key",
            )
        return
    dead = _reported_dead(ranks)
    for n, st in sorted(ranks.items()):
        if st.started and st.run_end is None:
            _not_ended(n, st, dead.get(n), emit, live)
        elif st.started and not st.closed:
            _not_closed(n, st, emit)
    _check_run_stream(run, ranks, set(range(world)), emit)


def _not_closed(n: int, st: EndState, emit: Emit) -> None:
    if st.head_ok > (st.run_end or 0):
        emit(
            "TG1212",
            n,
            st.head_ok + 1,
            f"record(s) seq {st.head_ok + 1}..{st.last_seq} of stream {n} were appended after "
            f"its final signed head (seq {st.head_ok}): the run did not write them",
        )
        return
    emit(
        "TG1212",
        n,
        st.last_seq,
        f"stream {n} has its run-end at seq {st.run_end} but does not end with a head signed "
        f"by its run key after it (its last record is seq {st.last_seq}): its final head was "
        "cut or rewritten",
    )


def _reported_dead(ranks: dict[int, EndState]) -> dict[int, tuple[int | None, int, int]]:
    """rank -> (last step, reporter, alert seq), as said by ranks whose stream closed signed."""
    dead: dict[int, tuple[int | None, int, int]] = {}
    for n, st in sorted(ranks.items()):
        if st.closed:
            for rank, (last, seq) in st.stopped.items():
                dead.setdefault(rank, (last, n, seq))
    return dead


def _not_ended(
    n: int, st: EndState, dead: tuple[int | None, int, int] | None, emit: Emit, live: bool
) -> None:
    if dead is not None:
        last, by, seq = dead
        reached = st.last_step if st.last_step is not None else -1
        if last is None or reached >= last:
            emit(
                "TG1211",
                n,
                st.last_seq + 1,
                f"rank {n} died (rank {by}'s alert at seq {seq} says it stopped or was blocked "
                f"after step {last}): its stream has no run-end or final head; "
                f"{_signed_part(st)}",
                severity=Severity.MEDIUM,
                reported_by=by,
                last_step=last,
            )
            return
        emit(
            "TG1211",
            n,
            st.last_seq + 1,
            f"rank {by} reported that rank {n} stopped after step {last}, but stream {n} "
            f"ends at step {reached}: its tail was cut",
            reported_by=by,
            last_step=last,
        )
        return
    if live:
        emit(
            "TG1211",
            n,
            st.last_seq + 1,
            f"stream {n} has no run-end record yet (--live: accepted as a run still "
            f"running); {_signed_part(st)}, and a cut back to an earlier signed head would "
            "not show until the run has ended",
            severity=Severity.INFO,
        )
        return
    emit(
        "TG1211",
        n,
        st.last_seq + 1,
        f"the run has no end record on stream {n}: it is still running (verify it with "
        f"--live), was killed, or its tail was cut; {_signed_part(st)}",
    )


def _check_run_stream(
    run: EndState | None,
    ranks: dict[int, EndState],
    world: set[int],
    emit: Emit,
) -> None:
    zero = ranks.get(0)
    if zero is None or not zero.started or zero.run_end is None:
        # A deleted stream 0 is reported above; one that has not ended (dead, still
        # running or cut) is the finding of its own stream: rank 0 writes the run
        # head only after its run-end.
        return
    if run is None or not run.closed:
        emit(
            "TG1212",
            RUN_STREAM,
            None if run is None else run.last_seq,
            "the run stream does not end with a run-summary and a run head signed by rank 0's "
            "run key: the run's final head was cut (or rank 0 died while closing)",
        )
        return
    missing = sorted((world | set(ranks)) - (run.listed or frozenset()))
    if missing:
        emit(
            "TG1212",
            RUN_STREAM,
            run.last_seq,
            f"the run's final head does not name stream(s) {', '.join(map(str, missing))}: "
            "they were added after the run closed",
        )


def _check_pins(
    ranks: dict[int, EndState], run: EndState | None, emit: Emit, expected: list[str]
) -> None:
    """Rank 0's key must be pinned; another rank's is pinned too, or vouched for by rank 0's
    final run head, which names a digest of that stream (and so its run-start)."""
    if not ranks:
        emit("TG1213", RUN_STREAM, None, "the run has no rank streams to match the pinned key")
    zero = ranks.get(0)
    anchored = zero is not None and key_id_matches(zero.key_id or "", expected)
    vouched: frozenset[int] = frozenset()
    if anchored and run is not None and run.closed:
        vouched = run.listed or frozenset()
    for n, st in sorted(ranks.items()):
        if st.key_id is None:
            emit(
                "TG1213",
                n,
                0,
                f"stream {n} carries no usable run key, but the run's key was pinned "
                "(--expect-key-id): the stream was rewritten without one",
            )
        elif not key_id_matches(st.key_id, expected) and (n == 0 or n not in vouched):
            how = (
                "the stream was rewritten whole with a new key"
                if n == 0
                else "pin it too, or rank 0's pinned key must vouch for it in a final run head"
            )
            emit(
                "TG1213",
                n,
                0,
                f"stream {n}'s run key {st.key_id[:16]} is not one of the pinned key ids: {how}",
                key_id=st.key_id,
            )
