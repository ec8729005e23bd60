"""Which segments a replay runs: the checkpoints in range cut it, each from its own file.

Every checkpoint recorded at a position is checked, not only the one a segment starts
from: a second file saved at a position (a doctored "release" copy beside the honest one)
is a segment of its own without steps, held to the same state as the position's other
checkpoints (the replay of the segment before it, or the ledger's record).
"""

from __future__ import annotations

import itertools

from trainguard.explain.replay.ledger import CheckpointRecord, RunHistory, locate
from trainguard.explain.replay.result import Segment


def plan_segments(
    history: RunHistory,
    begin: int,
    end: int,
    segmented: bool | None,
    search_dir: str | None,
    notes: list[str],
) -> list[Segment]:
    found: dict[int, CheckpointRecord] = {}
    every: dict[int, list[CheckpointRecord]] = {}  # position -> each found record there
    for c in history.checkpoints:
        if locate(c, search_dir) is not None:
            found[c.step] = c  # the last one saved at a step starts its segment
            every.setdefault(c.step, []).append(c)
        elif begin <= c.step < end:
            notes.append(f"checkpoint at step {c.step} not found ({c.name}); replayed through it")
    first = max((s for s in found if s <= begin), default=None)
    origin = first if first is not None else 0
    if first is None and begin > 0:
        notes.append(f"no checkpoint at or before step {begin}: replaying from the run's start")
    elif origin < begin:
        notes.append(f"step {begin} has no checkpoint: replaying from step {origin}")
    inner = sorted(s for s in found if origin < s < end)
    if segmented is None:
        segmented = len(inner) > 0
    bounds = [origin, *(inner if segmented else []), end]
    segments = []
    for a, b in itertools.pairwise(bounds):
        segments += _others(every, found, a)
        segments.append(Segment(a, b, found[a].name if a in found else None))
    if end in found:  # the checkpoint the range ends at: checked against the ledger, no steps
        segments += _others(every, found, end)
        segments.append(Segment(end, end, found[end].name))
    return segments


def _others(
    every: dict[int, list[CheckpointRecord]], found: dict[int, CheckpointRecord], at: int
) -> list[Segment]:
    """Every other checkpoint recorded at ``at``, checked without steps like the range's end:
    a second file at a position (a "release" copy doctored beside the honest one) is held to
    the same state, never left unchecked because another was saved after it."""
    return [
        Segment(at, at, c.name, blake3=c.blake3) for c in every.get(at, []) if c is not found[at]
    ]
