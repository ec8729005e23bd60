"""Whose word the verifier may take: streams whose run key is anchored.

Every stream names its own run key in its own run-start, so whoever can write
the database can add a stream signed by a key of their own that closes
perfectly.  What such a stream *says* must not count: an alert in it that a
peer died must not excuse that peer's missing end, and the world size its
run-start gives must not decide which streams belong to the run.  A stream's
word counts only when its key is anchored:

* ``--key`` was given: every head is checked with the user's own key;
* its key id is pinned with ``--expect-key-id``;
* it is rank 0's, the root: pinned when anything is pinned, else taken from
  the ledger itself (the trust of a verify without a pin, which the output
  says);
* rank 0's run-start names it (``run_keys``, the key id of every rank,
  gathered at watch start) and a head verified with rank 0's key covers that
  run-start;
* rank 0's final run head, verified with rank 0's key, names a record of its
  stream by the digest stored (so its run-start, and its key).

The world size comes from rank 0's records only, capped at :data:`MAX_WORLD`;
a stream numbered at or above it is not a rank of the run (TG1214).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from trainguard.ledger.chain import RUN_STREAM, is_hex_digest
from trainguard.ledger.runkey import key_id_matches

# More ranks than any training job runs on; a claim above it is refused, and no
# count read from the ledger is ever used to allocate or loop past it.
MAX_WORLD = 1 << 20
# The run-start field that lists every rank's run key id, by rank.
RUN_KEYS_FIELD = "run_keys"


class EndState(Protocol):
    """What ends.EndState gathered about a stream (only what is read here)."""

    started: bool
    key_state: str
    key_id: str | None
    world: int
    run_end: int | None
    head_ok: int
    listed: frozenset[int] | None
    peers: dict[int, str]
    vouched: bool

    @property
    def closed(self) -> bool: ...


def peer_key_ids(value: object) -> dict[int, str]:
    """rank -> key id, from a run-start's ``run_keys`` (anything malformed is left out)."""
    if not isinstance(value, list) or len(value) > MAX_WORLD:
        return {}
    return {n: k for n, k in enumerate(value) if is_hex_digest(k)}


@dataclass(frozen=True)
class Anchors:
    """Which rank streams' keys are anchored, and the world size the root gives."""

    ranks: frozenset[int]
    root: bool  # rank 0's key is anchored
    world: int | None  # from rank 0's records; None when rank 0 gives none (or too large)
    claimed: int  # the largest world size any record claims (capped), for missing streams
    too_large: tuple[tuple[int, int], ...]  # (stream, claim) over MAX_WORLD

    def why_not(self, n: int, zero: EndState | None) -> str:
        """Why stream ``n``'s key is not anchored, in words."""
        if not self.root:
            return "rank 0's run key is not anchored (not pinned, or rank 0's stream is gone)"
        ended = zero is not None and zero.run_end is not None
        named = zero is not None and bool(zero.peers)
        parts = ["it is not pinned"]
        parts.append(
            "rank 0's run-start does not name it"
            if named
            else "rank 0's run-start names no peer keys (or no head of rank 0 signs it)"
        )
        parts.append(
            "rank 0's final run head does not name it"
            if ended
            else "rank 0's stream has no end, so the final run head that would vouch for it "
            "was never written (or was cut)"
        )
        return ", ".join(parts[:-1]) + " and " + parts[-1]


def anchors(
    ranks: Mapping[int, EndState],
    run: EndState | None,
    *,
    given: bool,
    expected: list[str] | None,
) -> Anchors:
    zero = ranks.get(0)
    pinned = {
        n
        for n, st in ranks.items()
        if expected is not None and st.key_id is not None and key_id_matches(st.key_id, expected)
    }
    root = zero is not None and zero.started
    if root and zero is not None and not given:
        root = zero.key_state == "ok" and (expected is None or 0 in pinned)
    anchored: set[int] = set(ranks) if given else set(pinned)
    if root and zero is not None:
        anchored.add(0)
        if zero.head_ok >= 0:  # a head verified with rank 0's key covers its run-start
            anchored.update(n for n, st in ranks.items() if _named(zero, n, st))
        if run is not None and run.closed:
            listed = run.listed or frozenset()
            anchored.update(n for n, st in ranks.items() if st.vouched and n in listed)
    too_large = [(n, st.world) for n, st in sorted(ranks.items()) if st.world > MAX_WORLD]
    if run is not None and run.world > MAX_WORLD:
        too_large.append((RUN_STREAM, run.world))
    world: int | None = None
    if zero is not None and zero.started and 0 < zero.world <= MAX_WORLD:
        world = zero.world
        if run is not None and run.closed and 0 < run.world <= MAX_WORLD:
            world = max(world, run.world)
    claims = _claims(st.world for st in ranks.values() if st.started)
    if run is not None and run.run_end is not None:
        claims = max(claims, _claims([run.world]))
    return Anchors(
        frozenset(anchored), root, world, claims if world is None else world, tuple(too_large)
    )


def _named(zero: EndState, n: int, st: EndState) -> bool:
    return n != 0 and st.key_id is not None and zero.peers.get(n) == st.key_id


def _claims(values: Iterable[int]) -> int:
    return max([v for v in values if v <= MAX_WORLD] or [0])
