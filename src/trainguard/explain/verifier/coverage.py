"""What became of every recorded step: recomputed, skipped by the keyed draw, or uncovered.

A verifier that takes segment bounds from checkpoint records alone lets the
training process decide what is checked: a checkpoint record written ahead of
the steps (a segment judged with one step recorded), a second checkpoint at a
position already judged, an early run-end, a world size no stream shows.  Here
the bounds come from the step records each rank wrote, read in stream order:

- a checkpoint record's position must be the rank's step count when it is
  written (the guard records it right after the step it follows); one ahead
  of (or behind) the step records, or a second at one position with other
  bytes, is itself a finding (TG1514);
- a segment ``[a, b)`` is ready only once every rank recorded steps up to
  ``b - 1``; it is judged once per ``(a, b)``: a checkpoint that later splits
  a judged pair makes new pairs, each judged on its own, and the pairs at a
  position that gets a second checkpoint are judged again;
- the steps before the first checkpoint (from the entry's fresh build) and
  after the last (to the last recorded step, once the run ended) are
  segments too;
- records after a rank's run-end, and a run-end whose step count is not the
  rank's, are findings; one step record beyond the count is a step interrupted
  after its record (ledger/endcount.py, the rule `ledger verify` applies), held
  by the tail segment or, on a rank its peers did not follow, named as such.

At the end (or at a timeout) :meth:`Coverage.uncovered` names every recorded
step no recomputed or drawn-and-skipped segment holds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from trainguard.ledger.chain import HEAD_KIND, Record
from trainguard.ledger.endcount import end_count

RULE = "TG1514"
RECOMPUTED, SKIPPED, FAILED = "recomputed", "skipped", "failed"
MAX_NAMED = 10  # stretches of steps named in one message


@dataclass(frozen=True)
class Finding:
    message: str
    step: int | None
    evidence: dict[str, Any]


@dataclass
class Coverage:
    """Per rank, the step and checkpoint records read so far, and the segments judged."""

    first: dict[int, int] = field(default_factory=dict)  # rank -> its first step record
    last: dict[int, int] = field(default_factory=dict)  # rank -> its last step record
    # rank -> position -> the digest of the first checkpoint recorded there
    checkpoints: dict[int, dict[int, str]] = field(default_factory=dict)
    ended: dict[int, Any] = field(default_factory=dict)  # rank -> its run-end's step count
    interrupted: dict[int, int] = field(default_factory=dict)  # rank -> its uncounted step
    judged: dict[tuple[int, int], str] = field(default_factory=dict)  # (a, b) -> outcome
    findings: list[Finding] = field(default_factory=list)  # new ones, taken by the verifier
    _after_end: set[int] = field(default_factory=set)  # ranks already named for it

    # -- reading ------------------------------------------------------------------
    def feed(self, r: Record) -> None:
        """One record of a rank's stream, in stream order."""
        if r.stream < 0:
            return
        rank = r.stream
        if rank in self.ended and r.kind != HEAD_KIND and rank not in self._after_end:
            self._after_end.add(rank)
            self._find(
                f"rank {rank} wrote a {r.kind!r} record (seq {r.seq}) after its run-end: the "
                "run went on after it said it ended",
                r.step,
                {"rank": rank, "seq": r.seq, "kind": r.kind},
            )
        if r.kind == "step" and isinstance(r.step, int):
            self.first.setdefault(rank, r.step)
            self.last[rank] = r.step
        elif r.kind == "checkpoint" and isinstance(r.payload.get("step"), int):
            self._checkpoint(rank, int(r.payload["step"]), _restores(r.payload), r)
        elif r.kind == "run-end":
            self.ended[rank] = r.payload.get("steps")
            count = self.last[rank] + 1 if rank in self.last else 0
            claimed = r.payload.get("steps")
            if not isinstance(claimed, int) or isinstance(claimed, bool):
                return
            # One rule with `ledger verify` (TG1215): one record beyond the count is a step
            # interrupted after its record (Ctrl-C, a peer's timeout), not a finding.
            judged = end_count(claimed, count)
            if judged.interrupted is not None:
                self.interrupted[rank] = judged.interrupted
            elif not judged.holds:
                self._find(
                    f"rank {rank}'s run-end says {claimed} steps, but its step records "
                    f"reach {count}",
                    claimed,
                    {"rank": rank, "seq": r.seq, "claimed": claimed, "recorded": count},
                )

    def _checkpoint(self, rank: int, at: int, digest: str, r: Record) -> None:
        count = self.last[rank] + 1 if rank in self.last else 0
        if at != count:
            where = "ahead of" if at > count else "behind"
            self._find(
                f"rank {rank} recorded a checkpoint at step {at} when its step records "
                f"reached {count} ({where} them): a checkpoint's position is the steps "
                "done when it is saved",
                at,
                {"rank": rank, "seq": r.seq, "position": at, "steps_recorded": count},
            )
        seen = self.checkpoints.setdefault(rank, {})
        if at in seen and seen[at] != digest:
            self._find(
                f"rank {rank} recorded a second checkpoint at step {at} that restores other "
                f"state (seq {r.seq}): one position, one state",
                at,
                {"rank": rank, "seq": r.seq, "position": at, "state": [seen[at], digest]},
            )
            # Judged again, under the same draw: the replay then holds every file at the
            # position to what it recomputes (one saved after its pair was judged too).
            self.judged = {k: v for k, v in self.judged.items() if at not in k}
        seen.setdefault(at, digest)

    def _find(self, message: str, step: int | None, evidence: dict[str, Any]) -> None:
        self.findings.append(Finding(message, step, evidence))

    def take(self) -> list[Finding]:
        found, self.findings = self.findings, []
        return found

    # -- segments -----------------------------------------------------------------
    def end(self, world: int) -> int:
        """The position after the last step every rank recorded (0: none)."""
        if world < 1 or any(r not in self.last for r in range(world)):
            return 0
        return min(self.last[r] for r in range(world)) + 1

    def ready(self, world: int, finished: bool) -> list[tuple[int, int]]:
        """The segments not judged yet whose steps every rank has recorded: between
        consecutive checkpoints every rank saved, from 0 to the first one, and (once the
        run ended) from the last one to the last recorded step."""
        if world < 1:
            return []
        common = set.intersection(*(set(self.checkpoints.get(r, {})) for r in range(world)))
        end = self.end(world)
        bounds = sorted({0, *common})
        if finished and end > bounds[-1]:
            bounds.append(end)
        return [
            (a, b) for a, b in itertools.pairwise(bounds) if b <= end and (a, b) not in self.judged
        ]

    def mark(self, a: int, b: int, outcome: str) -> None:
        self.judged[(a, b)] = outcome

    def uncovered(self, world: int) -> dict[int, list[tuple[int, int]]]:
        """Rank -> the stretches ``[lo, hi)`` of its recorded steps that no recomputed or
        skipped segment holds (a failed one is reported as a problem of its own)."""
        held = sorted(self.judged)  # a failed one is an error verdict (exit 2) already
        out: dict[int, list[tuple[int, int]]] = {}
        for rank in sorted(set(self.last) | set(range(world))):
            if rank not in self.last:
                continue
            gaps, at = [], self.first[rank]
            for a, b in held:
                if a > at:
                    gaps.append((at, min(a, self.last[rank] + 1)))
                at = max(at, b)
            if at <= self.last[rank]:
                gaps.append((at, self.last[rank] + 1))
            gaps = [(lo, hi) for lo, hi in gaps if hi > lo]
            cut = self.interrupted.get(rank)
            if gaps and cut is not None and gaps[-1] == (cut, cut + 1):
                gaps.pop()  # named on its own (:meth:`cut_short`), not uncovered
            if gaps:
                out[rank] = gaps
        return out

    def cut_short(self, world: int) -> dict[int, int]:
        """Rank -> its interrupted step (recorded, never counted) that no segment holds.

        It ends no segment: a checkpoint after it cannot exist, and on a data-parallel
        run the ranks that did not record it never finished it, so there is nothing to
        recompute it with (with one rank, or all of them, the tail segment holds it)."""
        held = sorted(self.judged)
        return {
            rank: step
            for rank, step in sorted(self.interrupted.items())
            if self.last.get(rank) == step and not any(a <= step < b for a, b in held)
        }


def stretches(gaps: list[tuple[int, int]]) -> str:
    """``[(3, 5), (9, 10)]`` -> ``3..4, 9``."""
    named = [f"{lo}..{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in gaps[:MAX_NAMED]]
    more = f" and {len(gaps) - MAX_NAMED} more" if len(gaps) > MAX_NAMED else ""
    return ", ".join(named) + more


# What a checkpoint record says its file restores: weights, optimizer, random states and
# the carried state (scheduler, hyper-parameters, data position, buffers).  Two honest
# files saved at one step (``latest.pt`` and ``step-N.pt``) differ in bytes, since
# torch.save names its archive after the file, but restore the same state.
_RESTORES = ("params", "optimizer", "plain", "rng", "carried")


def _restores(payload: dict[str, Any]) -> str:
    state = {k: payload.get(k) for k in _RESTORES}
    text = json.dumps(state, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
