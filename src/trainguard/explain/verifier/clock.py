"""Steps' claimed durations held to the ledger server's clock (TG1513).

A training process can hide time it spends (sleeps that slow a run down, work
it does on the side) from the step-time check (TG1307) by patching the clock
the guard reads: the ledger then claims fast, even steps.  It cannot patch the
PostgreSQL server's clock: every record carries ``server_time``, set by the
server when it stored the record (ledger/postgres_store.py).

For one rank, step ``k``'s record is stored ``d_k`` seconds after the step
ended (the guard's checks, building the record, the round trip and the
commit).  ``D_k``, the server's time from the rank's run-start record to step
``k``'s record minus the claimed durations of the steps up to ``k``, is then
``d_k - d_start - x`` for an honest run (``x``: the guard's set-up between its
clock's start and the run-start record, never negative) however long the run.
So ``D`` stays inside a band as wide as the spread of ``d``, and both ways out
of it are findings, beyond :data:`CLOCK_SLACK_S` plus the clocks' rate
difference (:data:`CLOCK_DRIFT` of the server's elapsed time):

- a **rise**: time the claims do not show (a hidden sleep), whether the
  records went out live or were held back and written after it (held records
  reach the server late, which is a rise from the live run-start record);
- a **fall**: records reached the server faster than their claimed durations
  say they were made, so they were held back and written in a burst (the
  run-start record held too).  The run-start record only bounds rises (``x``
  is unknown), except for the wall times below, where it is exact.

``D`` is measured from the anchor, never reset: a step with no record counts
as claimed 0 (its time shows as a rise), and a missing step number is itself a
finding, as is a step number that goes back.  The same is done with the
records' wall times (``time.time()`` when each was made): a lie there is
medium, since an honest wall clock may be stepped (NTP), which the step
durations never are.

Records written late, after a ledger outage (ledger/outage.py), reach the
server in a burst followed by a ``ledger-outage`` record; those points are
left out of the band (the live ones after them still count from the same
anchor, so the outage hides nothing after it).  The process can write such a
record itself, so it excuses records only when the server backs it: they are
the ``written_late`` records right before it, their wall times inside its span,
and the server saw nothing of the stream before them for at least their
claimed durations.  Otherwise it is a finding (medium) and excuses nothing.
Excused records are always reported (:meth:`ServerClock.notes`), as are step
records that carry no server time.  Points are judged only once they are
:data:`SETTLE_S` older than the stream's newest record (or it has ended), so
that the outage record after a burst has arrived.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trainguard.ledger.chain import Record
from trainguard.ledger.endcount import end_count
from trainguard.ledger.outage import MAX_BUFFERED, OUTAGE_KIND

# The most an honest rank's stored-time delays (step end to the server's stamp) may
# differ.  Measured on a local server (bench/server_clock_bench.py, docs/ledger.md):
# the largest rise over runs of 150-200 steps was 0.03 s on a 2-core host at load
# average 3 and 0.06 s at load average 8-11 (two processes spinning besides).  2 s
# leaves room for longer stalls (swap, a remote server's round trips) and is small
# against time worth hiding.
CLOCK_SLACK_S = 2.0
# Clocks tick at slightly different rates: NTP slews a clock by at most 500 ppm.
CLOCK_DRIFT = 1e-3
# A late-written burst is followed by its ledger-outage record within this long.
SETTLE_S = 60.0
RULE = "TG1513"
_LISTED = 10  # step gaps named in one finding


@dataclass
class _Point:
    step: int | None  # None: the run-start record (the anchor)
    server: float
    claimed: float  # this step's step_time (seconds since the step before ended)
    wall: float  # the record's time: the client's wall clock when it was made
    d_claimed: float = 0.0  # D against the claimed durations, from the anchor
    d_wall: float = 0.0  # D against the wall times, from the anchor
    late: bool = False


@dataclass
class _Band:
    """Where ``D`` first left the band upwards (a rise) and downwards (a fall).

    A rise is ``D_j - D_i`` over points ``i`` before ``j`` less the drift allowance, so
    the running minimum of ``D - drift * server`` is kept (and the running maximum of
    ``D + drift * server`` for falls); the levels are kept to name the shortest stretch
    that explains the finding once it is found."""

    anchor_falls: bool  # whether the anchor may start a fall (exact only for wall times)
    levels: list[tuple[float, float, int | None, bool]] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    found: dict[str, tuple[float, int | None, int | None]] = field(default_factory=dict)
    widest: dict[str, float] = field(default_factory=lambda: {"rise": 0.0, "fall": 0.0})

    def add(self, d: float, server: float, step: int | None) -> None:
        if not math.isfinite(d):  # a wall time that is no time: nothing to compare
            return
        up, down = d - CLOCK_DRIFT * server, d + CLOCK_DRIFT * server
        if self.low is not None:  # measured for the slack (bench/server_clock_bench.py)
            self.widest["rise"] = max(self.widest["rise"], up - self.low)
        if self.high is not None:
            self.widest["fall"] = max(self.widest["fall"], self.high - down)
        if "rise" not in self.found and self.low is not None and up - self.low > CLOCK_SLACK_S:
            i = self._stretch(lambda u, _: up - u > CLOCK_SLACK_S)
            self.found["rise"] = (up - self.low, i, step)
        if "fall" not in self.found and self.high is not None and self.high - down > CLOCK_SLACK_S:
            i = self._stretch(lambda _, w: w - down > CLOCK_SLACK_S, falls=True)
            self.found["fall"] = (self.high - down, i, step)
        anchor = step is None
        self.levels.append((up, down, step, anchor))
        self.low = up if self.low is None else min(self.low, up)
        if not anchor or self.anchor_falls:
            self.high = down if self.high is None else max(self.high, down)

    def _stretch(self, beyond: Any, falls: bool = False) -> int | None:
        """The step of the latest earlier point the finding already holds from."""
        for up, down, step, anchor in reversed(self.levels):
            if (not anchor or not falls or self.anchor_falls) and beyond(up, down):
                return step
        return None


@dataclass
class _Stream:
    points: list[_Point] = field(default_factory=list)
    recent: deque[tuple[float, float | None, _Point | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_BUFFERED + 2)
    )  # (wall, server, point) of the records since the newest that may start a burst
    anchor: _Point | None = None
    total_claimed: float = 0.0
    last_step: int | None = None
    step_gaps: list[tuple[int, int]] = field(default_factory=list)  # (after, next) steps
    judged: int = 0  # points[:judged] are settled and in the bands
    claimed: _Band = field(default_factory=lambda: _Band(anchor_falls=False))
    wall: _Band = field(default_factory=lambda: _Band(anchor_falls=True))
    excused: list[tuple[int, int, int, float]] = field(default_factory=list)  # n, a, b, gap
    refused: list[str] = field(default_factory=list)
    with_server: int = 0
    without: int = 0
    ended: bool = False
    alerted: set[str] = field(default_factory=set)


class ServerClock:
    """Fed each rank's records in order (:meth:`feed`); :meth:`judge` gives new alerts."""

    def __init__(self) -> None:
        self.streams: dict[int, _Stream] = {}

    @property
    def without(self) -> int:
        """Step records that carry no server time (each is also reported)."""
        return sum(s.without for s in self.streams.values())

    def feed(self, record: Record) -> None:
        if record.stream < 0:
            return
        stream = self.streams.setdefault(record.stream, _Stream())
        point: _Point | None = None
        if record.kind == "run-end":
            stream.ended = True
            total = record.payload.get("steps")  # the guard's step count: trailing drops too
            if isinstance(total, int) and not isinstance(total, bool):
                done = 0 if stream.last_step is None else stream.last_step + 1
                # One record beyond the count is an interrupted step (the rule `ledger
                # verify` and the coverage apply): its duration is held like any other.
                if not end_count(total, done).holds:
                    stream.step_gaps.append((done - 1, total))
        elif record.kind == OUTAGE_KIND:
            self._outage(stream, record)
        elif record.kind == "run-start" and record.server_time is not None and not stream.points:
            point = stream.anchor = _Point(None, record.server_time, 0.0, record.time)
            stream.points.append(point)
        elif record.kind == "step" and record.step is not None:
            self._step_number(stream, record.step)
            claimed = record.payload.get("step_time")
            if record.server_time is None or not isinstance(claimed, (int, float)):
                stream.without += 1
            else:
                stream.with_server += 1
                # A claim that is no duration (NaN, infinite, negative: never from the
                # guard's monotonic clock) counts as 0, so the time shows; never NaN in D.
                seconds = float(claimed) if 0 <= claimed < math.inf else 0.0
                point = _Point(record.step, record.server_time, seconds, record.time)
                self._measure(stream, point)
                stream.points.append(point)
        stream.recent.append((record.time, record.server_time, point))

    @staticmethod
    def _step_number(stream: _Stream, step: int) -> None:
        expected = 0 if stream.last_step is None else stream.last_step + 1
        if step != expected:
            stream.step_gaps.append((expected - 1, step))
        stream.last_step = step if stream.last_step is None else max(stream.last_step, step)

    @staticmethod
    def _measure(stream: _Stream, p: _Point) -> None:
        if stream.anchor is None:  # no run-start with a server time: the first step anchors
            stream.anchor = p
        else:
            stream.total_claimed += p.claimed
        a = stream.anchor
        p.d_claimed = (p.server - a.server) - stream.total_claimed
        p.d_wall = (p.server - a.server) - (p.wall - a.wall)

    @staticmethod
    def _outage(stream: _Stream, record: Record) -> None:
        """Excuse the records an outage record names, if the server's times back it."""
        first, last = record.payload.get("first"), record.payload.get("last")
        count = record.payload.get("written_late")
        if not (isinstance(first, (int, float)) and isinstance(last, (int, float))):
            return
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return
        if len(stream.refused) >= _LISTED:
            return  # past the first refusals (reported), more of them excuse nothing either
        burst: list[tuple[float, float | None, _Point | None]] = []
        before = None
        for item in reversed(stream.recent):  # the records right before it, newest first
            if len(burst) < count and first <= item[0] <= last:
                burst.append(item)
            else:
                before = item
                break
        burst.reverse()
        points = [p for _, _, p in burst if p is not None and p.step is not None]
        why, gap = _unbacked(burst, before, points, count)
        if why:
            stream.refused.append(why)
            return
        for p in points:
            p.late = True
        if points:
            stream.excused.append((len(points), points[0].step or 0, points[-1].step or 0, gap))
        stream.recent.clear()

    def judge(self, *, final: bool = False) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(severity, message, step, evidence) of each new finding, once per stream and
        kind: the server's clock contradicts the claims, step records are missing, an
        outage excuse is not backed, or some step records carry no server time."""
        out = []
        for rank, stream in sorted(self.streams.items()):
            self._settle(stream, final or stream.ended)
            for kind, band, severity in (
                ("step_time", stream.claimed, "high"),
                ("wall time", stream.wall, "medium"),
            ):
                for way, (excess, i, j) in band.found.items():
                    if f"{kind}/{way}" in stream.alerted:
                        continue
                    stream.alerted.add(f"{kind}/{way}")
                    out.append(_band_alert(rank, stream, kind, way, severity, excess, i, j))
            out.extend(self._other(rank, stream))
        return out

    @staticmethod
    def _other(rank: int, stream: _Stream) -> list[tuple[str, str, int, dict[str, Any]]]:
        out = []
        if stream.step_gaps and "steps" not in stream.alerted:
            stream.alerted.add("steps")
            gaps = stream.step_gaps[:_LISTED]
            named = ", ".join(
                f"{a + 1}"
                if b == a + 2
                else f"{a + 1}..{b - 1}"
                if b > a + 1
                else f"back from {a} to {b}"
                for a, b in gaps
            )
            message = (
                f"rank {rank}: step records are missing or out of order (steps {named}): a "
                "step's record was dropped or held back, and its duration cannot be held to "
                "the server's clock"
            )
            evidence = {"rank": rank, "compared": "step numbers", "gaps": gaps}
            out.append(("high", message, max(0, gaps[0][0] + 1), evidence))
        if stream.refused and "refused" not in stream.alerted:
            stream.alerted.add("refused")
            message = (
                f"rank {rank}: a ledger-outage record is not backed by the server's times "
                f"({stream.refused[0]}); it excuses nothing (a process can write one itself)"
            )
            evidence = {"rank": rank, "compared": "outage", "refused": stream.refused[:_LISTED]}
            out.append(("medium", message, stream.last_step or 0, evidence))
        if stream.without and stream.with_server and "without" not in stream.alerted:
            stream.alerted.add("without")
            message = (
                f"rank {rank}: {stream.without} step records carry no server time, so their "
                "durations were not held to the server's clock (rows written around the "
                "column, or a table altered during the run)"
            )
            evidence = {"rank": rank, "compared": "server time", "without": stream.without}
            out.append(("medium", message, stream.last_step or 0, evidence))
        return out

    def notes(self) -> list[str]:
        """What the check left out, always said: excused bursts and absent server times."""
        out = []
        for rank, stream in sorted(self.streams.items()):
            for n, a, b, gap in stream.excused:
                out.append(
                    f"rank {rank}: {n} step records (steps {a}..{b}) written late after a "
                    f"ledger outage (the server saw nothing for {gap:.1f} s before them) are "
                    "not held to its clock; the records after them are"
                )
            if stream.without and not stream.with_server:
                out.append(
                    f"rank {rank}: no step record carries a server time (not a PostgreSQL "
                    "ledger with the server_time column): TG1513 did not run"
                )
        return out

    def _settle(self, stream: _Stream, everything: bool) -> None:
        if not stream.points:
            return
        newest = stream.points[-1].server
        while stream.judged < len(stream.points):
            p = stream.points[stream.judged]
            if not everything and newest - p.server < SETTLE_S:
                return
            stream.judged += 1
            if p.late:
                continue
            stream.claimed.add(p.d_claimed, p.server, p.step)
            stream.wall.add(p.d_wall, p.server, p.step)


def _unbacked(
    burst: list[tuple[float, float | None, _Point | None]],
    before: tuple[float, float | None, _Point | None] | None,
    points: list[_Point],
    count: int,
) -> tuple[str, float]:
    """Why the server's times do not back an outage excuse for ``burst`` ('' if they do),
    and the server's gap before it.  Honest late records were all made (wall time) after
    the record before them was stored and before the first of them was: the server was
    away between, for at least the claimed durations of the steps after the first."""
    if len(burst) < count:
        return f"only {len(burst)} of the {count} records it names are right before it", 0.0
    if before is None or before[1] is None or burst[0][1] is None:
        return "the server stored nothing of the stream before them", 0.0
    gap = burst[0][1] - before[1]
    claimed = sum(p.claimed for p in points[1:])
    if gap < claimed - CLOCK_SLACK_S:
        return (
            f"the server saw {gap:.2f} s before them, less than their claimed {claimed:.2f} s",
            gap,
        )
    made = max(wall for wall, _, _ in burst) - before[0]
    if made > gap + CLOCK_SLACK_S:
        return (
            f"they were made over {made:.2f} s by their wall times, after the server's "
            f"{gap:.2f} s gap before them ended: they went out live"
        ), gap
    return "", gap


def _band_alert(
    rank: int, stream: _Stream, kind: str, way: str, severity: str,
    excess: float, i: int | None, j: int | None,
) -> tuple[str, str, int, dict[str, Any]]:  # fmt: skip
    start = "the run start" if i is None else f"step {i}"
    evidence = {
        "rank": rank,
        "compared": kind,
        "direction": way,
        "unexplained_seconds": round(excess, 3),
        "steps": [i, j],
        "slack_seconds": CLOCK_SLACK_S,
        "drift": CLOCK_DRIFT,
        "records_excused_by_outages": sum(e[0] for e in stream.excused),
    }
    if way == "rise":
        message = (
            f"rank {rank}: from {start} to step {j} the ledger server saw {excess:.2f} s more "
            f"time pass than the records' {kind} claims (a clock that hides sleeps or other "
            "work from the step-time check, or records held back and written late)"
        )
    else:
        message = (
            f"rank {rank}: from {start} to step {j} the records reached the ledger server "
            f"{excess:.2f} s faster than their {kind} says they were made: they were held "
            "back and written in a burst (which hides when time was spent)"
        )
    return severity, message, j if j is not None else 0, evidence
