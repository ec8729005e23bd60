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
  under its signature, with an anchored key (ledger/anchor.py), reported it
  stopped (TG1311, or blocked behind a dead one: TG1314) at a step the dead
  rank's stream still reaches: that is explained at medium severity.  A
  report from a stream whose key nothing anchors explains nothing: anyone can
  add a stream that closes under a key of their own;
* the world size comes from rank 0's records; a stream numbered at or above
  it is not a rank of the run (TG1214).

This module only judges the facts the verifier gathered while it read the
records (:class:`EndState`); it reads no ledger itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainguard.findings import Severity
from trainguard.ledger.anchor import (
    MAX_WORLD,
    RUN_KEYS_FIELD,
    Anchors,
    anchors,
    peer_key_ids,
)
from trainguard.ledger.chain import RUN_STREAM
from trainguard.ledger.endcount import end_count
from trainguard.ledger.runkey import key_id_matches

# The monitor's alerts that a peer stopped (TG1311) or was left blocked in a collective
# behind a dead one (TG1314, then ended by the process group's timeout or the
# launcher), with the evidence key that names the rank.
STOPPED_RULES = {"TG1311": "stopped_rank", "TG1314": "blocked_rank"}

Emit = Callable[..., None]
MAX_NAMED = 20  # stream numbers one message lists


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
    # A guard writes one step record per step, in order, from 0: the step the next one
    # must carry, the first record that did not (seq, step it carried) and the run-end's
    # own count of steps.
    next_step: int = 0
    step_break: tuple[int, int] | None = None
    end_steps: int | None = None
    head_ok: int = -1  # seq of the last head verified with the stream's key, matching
    listed: frozenset[int] | None = None  # the run stream's last verified head names these
    # rank -> (the last step it reported, the seq of the alert saying so)
    stopped: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    peers: dict[int, str] = field(default_factory=dict)  # its run-start's run_keys, by rank
    # A signed run head named one of its records by the digest stored: the run head
    # vouches for this very stream (and so its run-start and key), not just its number.
    vouched: bool = False

    @property
    def closed(self) -> bool:
        """It ended and its last record is a head verified with its key."""
        return self.run_end is not None and self.head_ok == self.last_seq

    def observe(self, kind: str, seq: int, step: int | None, payload: dict[str, Any]) -> None:
        if kind == "run-start" and seq == 0:
            self.started = True
            self.world = max(self.world, _count(payload.get("world_size")))
            self.peers = peer_key_ids(payload.get(RUN_KEYS_FIELD))
        elif kind in ("run-end", "run-summary"):
            self.run_end = seq
            self.world = max(self.world, _count(payload.get("world_size")))
            steps = payload.get("steps")
            if kind == "run-end" and isinstance(steps, int) and not isinstance(steps, bool):
                self.end_steps = steps
        elif kind == "step" and step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)
            if step != self.next_step and self.step_break is None:
                self.step_break = (seq, step)
            self.next_step = max(self.next_step, step + 1)
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
    """Emit the end-of-run findings; ``reported`` are streams already found deleted.

    ``pinned``: a key was given (--key), so every head was checked with it.
    """
    ranks = {n: s for n, s in streams.items() if n != RUN_STREAM}
    run = streams.get(RUN_STREAM)
    for n, st in sorted(ranks.items()):
        _check_steps(n, st, emit)
    # Rank 0 writes the run-summary only when it signs: a run stream that holds one
    # was signed, even if every rank stream is gone.
    keyed = any(s.key_state in ("ok", "bad") for s in ranks.values()) or (
        run is not None and run.run_end is not None
    )
    trust = anchors(ranks, run, given=pinned, expected=expected)
    if expected is not None:
        _check_pins(ranks, run, emit, expected, trust)
    _check_world(ranks, trust, emit, reported)
    if not keyed and not pinned:
        if expected is None:
            off = any(s.key_state == "off" for s in ranks.values())
            # The verifier sees what the run-start says, not how it came to say it.
            why = (
                "its run-start records say signing was off (run_key: null, as "
                "watch(sign_key=False) writes)"
                if off
                else "its run-start records carry no run key: a ledger from before signing, "
                "or one whose run-start records were rewritten to drop their keys"
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
    dead, unanchored = _reported_dead(ranks, trust)
    for n, st in sorted(ranks.items()):
        if st.started and st.run_end is None:
            _not_ended(n, st, dead.get(n), emit, live, unanchored.get(n), trust, ranks.get(0))
        elif st.started and not st.closed:
            _not_closed(n, st, emit)
    _check_run_stream(run, ranks, trust.world or trust.claimed, emit)


def _check_steps(n: int, st: EndState, emit: Emit) -> None:
    """TG1215: a started stream's step records are 0, 1, 2, ... once each, and its
    run-end counts them.  Signed or not: a chain is hashed over whatever records it
    was given, so records dropped before they were chained (a step record held in
    memory for a batched write, then deleted) leave it intact."""
    if not st.started:
        return  # a stream without its start is already a finding of its own
    if st.step_break is not None:
        seq, step = st.step_break
        expected = "the next step" if step > 0 else "step 0"
        emit(
            "TG1215",
            n,
            seq,
            f"stream {n}: the step record at seq {seq} is for step {step}, not {expected} "
            "in order: step records were dropped, repeated or renumbered before they were "
            "chained",
            step=step,
        )
    elif st.end_steps is not None and not end_count(st.end_steps, st.next_step).holds:
        # One record more than the run-end counts is honest (ledger/endcount.py: the one
        # rule verify-run's coverage and clock apply too).  Fewer records than counted:
        # dropped; more than one beyond it: steps the run's own count disowns.
        why = (
            "the last step records were dropped before the run-end was chained"
            if st.next_step < st.end_steps
            else "records of steps the guard never counted (one interrupted step leaves "
            "one, not more)"
        )
        emit(
            "TG1215",
            n,
            st.run_end,
            f"stream {n}: its run-end counts {st.end_steps} step(s) but its step records "
            f"run 0..{st.next_step - 1}: {why}",
            steps=st.end_steps,
            recorded=st.next_step,
        )


def _check_world(
    ranks: dict[int, EndState], trust: Anchors, emit: Emit, reported: set[int]
) -> None:
    """Missing ranks (TG1202), and streams that are no rank of the run (TG1214)."""
    for n, claim in trust.too_large:
        emit(
            "TG1214",
            n,
            0,
            f"stream {n}'s records claim a world size of {claim}, over the limit {MAX_WORLD}: "
            "no run watch wrote; the claim is ignored",
            claimed=claim,
        )
    # Signed or not, the ranks that rank 0's records count must be there (with no rank 0
    # to say, what any stream claims: more findings, never fewer).  Iterated, never
    # materialised: the count is capped, the findings are capped by the verifier.
    world = trust.claimed
    for n in range(world):
        if n not in ranks and n not in reported:
            emit(
                "TG1202",
                n,
                0,
                f"the run's records say it had {world} ranks, but stream {n} has no records: "
                "it was deleted",
            )
    watched = any(st.started or st.run_end is not None for st in ranks.values())
    if world == 0 and watched and 0 not in ranks and 0 not in reported:
        # Every watched run has a rank 0 (its streams start and end with the records
        # watch writes); no claim to count ranks by is no reason to miss it.
        emit("TG1202", 0, 0, "the run has rank streams but no rank 0: its stream was deleted")
    for n in sorted(ranks):
        if n >= MAX_WORLD and (trust.world is None or n < trust.world):
            emit(
                "TG1214",
                n,
                0,
                f"stream {n} is numbered over the largest world size a run can have "
                f"({MAX_WORLD}): no rank of any run, someone else added it",
            )
    if trust.world is None:
        return
    for n in sorted(ranks):
        if n >= trust.world:
            emit(
                "TG1214",
                n,
                0,
                f"stream {n} is not a rank of the run: rank 0's run-start gives a world size "
                f"of {trust.world}, so its records were added by someone else",
                world_size=trust.world,
            )


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


def _reported_dead(
    ranks: dict[int, EndState], trust: Anchors
) -> tuple[dict[int, tuple[int | None, int, int]], dict[int, list[int]]]:
    """rank -> (last step, reporter, alert seq), as said by ranks whose stream closed signed
    with an anchored key; and rank -> the closed but unanchored ranks that said so too."""
    dead: dict[int, tuple[int | None, int, int]] = {}
    unanchored: dict[int, list[int]] = {}
    for n, st in sorted(ranks.items()):
        if not st.closed:
            continue
        for rank, (last, seq) in st.stopped.items():
            if n in trust.ranks and (trust.world is None or n < trust.world):
                dead.setdefault(rank, (last, n, seq))
            elif len(unanchored.setdefault(rank, [])) < 3:
                unanchored[rank].append(n)
    return dead, unanchored


def _not_ended(
    n: int,
    st: EndState,
    dead: tuple[int | None, int, int] | None,
    emit: Emit,
    live: bool,
    unanchored: list[int] | None = None,
    trust: Anchors | None = None,
    zero: EndState | None = None,
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
    if unanchored and trust is not None:
        by = unanchored[0]
        names = ", ".join(map(str, unanchored))
        emit(
            "TG1211",
            n,
            st.last_seq + 1,
            f"the run has no end record on stream {n}; only stream(s) {names} report rank "
            f"{n} stopped, and rank {by}'s run key is not anchored ({trust.why_not(by, zero)}): "
            "a stream added with a key of its own would say the same, so this explains "
            f"nothing (pin rank {by}'s key id to take its word); {_signed_part(st)}",
            unanchored_reporters=names,
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
    world: int,
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
    listed = run.listed or frozenset()
    # Counted, not collected: the world size is capped, but a listing of it is not printed.
    names = [n for n in sorted(ranks) if n not in listed]
    count = len(names)
    for n in range(world):
        if n not in ranks and n not in listed:
            count += 1
            names.append(n)
            if len(names) > MAX_NAMED:
                names = sorted(names)[:MAX_NAMED]
    if count:
        more = f" and {count - MAX_NAMED} more" if count > MAX_NAMED else ""
        shown = ", ".join(map(str, sorted(names)[:MAX_NAMED]))
        emit(
            "TG1212",
            RUN_STREAM,
            run.last_seq,
            f"the run's final head does not name stream(s) {shown}{more}: "
            "they were added after the run closed",
        )


def _check_pins(
    ranks: dict[int, EndState],
    run: EndState | None,
    emit: Emit,
    expected: list[str],
    trust: Anchors,
) -> None:
    """Rank 0's key must be pinned; another rank's is pinned too, or vouched for by rank 0's
    run-start (which names every rank's key id) or its final run head (which names a digest
    of that stream, and so its run-start)."""
    if not ranks:
        emit("TG1213", RUN_STREAM, None, "the run has no rank streams to match the pinned key")
    zero = ranks.get(0)
    for n, st in sorted(ranks.items()):
        if st.key_id is None:
            emit(
                "TG1213",
                n,
                0,
                f"stream {n} carries no usable run key, but the run's key was pinned "
                "(--expect-key-id): the stream was rewritten without one",
            )
        elif n == 0 and not key_id_matches(st.key_id, expected):
            emit(
                "TG1213",
                n,
                0,
                f"stream 0's run key {st.key_id[:16]} is not one of the pinned key ids: the "
                "stream was rewritten whole with a new key",
                key_id=st.key_id,
            )
        elif n != 0 and n not in trust.ranks:
            # Rank 0 died before its run head: nothing it signed can vouch for this key,
            # which is then unknown, not shown to be another (high, not critical).
            unended = trust.root and zero is not None and zero.run_end is None
            emit(
                "TG1213",
                n,
                0,
                f"stream {n}'s run key {st.key_id[:16]} is neither pinned nor vouched for: "
                f"{trust.why_not(n, zero)}; pin rank {n}'s key id too (watch logs it)",
                severity=Severity.HIGH if unended else None,
                key_id=st.key_id,
            )
