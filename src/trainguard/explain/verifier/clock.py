"""Steps' claimed durations held to the ledger server's clock (TG1513).

A training process can hide time it spends (sleeps that slow a run down, work
it does on the side) from the step-time check (TG1307) by patching the clock
the guard reads: the ledger then claims fast, even steps.  It cannot patch the
PostgreSQL server's clock: every record carries ``server_time``, set by the
server when it stored the record (ledger/postgres_store.py).

For one rank, step ``k``'s record is stored ``d_k`` seconds after the step
ended (the guard's checks, building the record, the round trip and the
commit), so the server's gap between two consecutive step records is
``claimed_k + d_k - d_(k-1)`` for an honest run.  Summed over any run of steps
the ``d`` telescope: the server's elapsed time minus the claimed one, ``D``,
stays within the spread of ``d`` however long the run.  Time hidden from the
claimed durations makes ``D`` rise and never come back.  So the check is on
the largest rise of ``D`` over any stretch of steps (one pass, a running
minimum), beyond :data:`CLOCK_SLACK_S` plus the clocks' rate difference
(:data:`CLOCK_DRIFT` of the server's elapsed time).  A long sleep in one step
and short sleeps in many add up alike.  The same is done with the records'
wall times (``time.time()`` when each was made): a lie there is medium, since
an honest wall clock may be stepped (NTP), which the step durations never are.

Records written late, after a ledger outage (ledger/outage.py), reach the
server in a burst: the gaps into them are not compared.  Which records those
are is known from the ``ledger-outage`` record written after them, so points
are judged only once they are :data:`SETTLE_S` older than the stream's newest
record (or the stream has ended).  A training process can write such an
outage record itself: the excused gaps are counted in the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainguard.ledger.chain import Record
from trainguard.ledger.outage import OUTAGE_KIND

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


@dataclass
class _Point:
    step: int
    server: float
    claimed: float  # the step record's step_time (seconds since the step before ended)
    wall: float  # the record's time: the client's wall clock when it was made
    late: bool = False


@dataclass
class _Rise:
    """The largest rise of ``D - drift * server`` seen so far, where it began and ended."""

    value: float = 0.0
    low: float | None = None
    low_at: int = -1
    start: int = -1
    end: int = -1
    excess: float = 0.0

    def add(self, d: float, server: float, step: int) -> None:
        level = d - CLOCK_DRIFT * server
        if self.low is None or level < self.low:
            self.low, self.low_at = level, step
        elif level - self.low > self.value:
            self.value, self.start, self.end = level - self.low, self.low_at, step


@dataclass
class _Stream:
    points: list[_Point] = field(default_factory=list)
    judged: int = 0  # points[:judged] are settled and summed into the rises
    previous: _Point | None = None
    d_claimed: float = 0.0
    d_wall: float = 0.0
    claimed: _Rise = field(default_factory=_Rise)
    wall: _Rise = field(default_factory=_Rise)
    excused: int = 0
    ended: bool = False
    alerted: set[str] = field(default_factory=set)


class ServerClock:
    """Fed each rank's records in order (:meth:`feed`); :meth:`judge` gives new alerts."""

    def __init__(self) -> None:
        self.streams: dict[int, _Stream] = {}
        self.without = 0  # step records that carry no server time

    def feed(self, record: Record) -> None:
        if record.stream < 0:
            return
        stream = self.streams.setdefault(record.stream, _Stream())
        if record.kind == "run-end":
            stream.ended = True
        elif record.kind == OUTAGE_KIND:
            first, last = record.payload.get("first"), record.payload.get("last")
            if isinstance(first, (int, float)) and isinstance(last, (int, float)):
                for p in stream.points:
                    if first <= p.wall <= last:
                        p.late = True
        elif record.kind == "step" and record.step is not None:
            claimed = record.payload.get("step_time")
            if record.server_time is None or not isinstance(claimed, (int, float)):
                self.without += 1
                return
            stream.points.append(_Point(record.step, record.server_time, claimed, record.time))

    def judge(self, *, final: bool = False) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(severity, message, step, evidence) of each stream whose claims the server's
        clock contradicts, once per stream and kind."""
        out = []
        for rank, stream in sorted(self.streams.items()):
            self._settle(stream, final or stream.ended)
            for kind, rise, severity in (
                ("step_time", stream.claimed, "high"),
                ("wall time", stream.wall, "medium"),
            ):
                if rise.value <= CLOCK_SLACK_S or kind in stream.alerted:
                    continue
                stream.alerted.add(kind)
                evidence = {
                    "rank": rank,
                    "compared": kind,
                    "unexplained_seconds": round(rise.value, 3),
                    "steps": [rise.start, rise.end],
                    "slack_seconds": CLOCK_SLACK_S,
                    "drift": CLOCK_DRIFT,
                    "gaps_excused_by_outages": stream.excused,
                }
                message = (
                    f"rank {rank}: between steps {rise.start} and {rise.end} the ledger server "
                    f"saw {rise.value:.2f} s more time pass than the records' {kind} claims "
                    "(a clock that hides sleeps or other work from the step-time check)"
                )
                out.append((severity, message, rise.end, evidence))
        return out

    def _settle(self, stream: _Stream, everything: bool) -> None:
        if not stream.points:
            return
        newest = stream.points[-1].server
        while stream.judged < len(stream.points):
            p = stream.points[stream.judged]
            if not everything and newest - p.server < SETTLE_S:
                return
            prev, stream.previous = stream.previous, p
            stream.judged += 1
            if prev is None:
                stream.claimed.add(0.0, p.server, p.step)
                stream.wall.add(0.0, p.server, p.step)
                continue
            if p.late or prev.late or p.step != prev.step + 1:
                # Not comparable (written late, or steps missing between): D stays, and
                # the running minimum restarts so that the gap can never count as a rise.
                stream.excused += p.late
                stream.claimed.low = stream.wall.low = None
            else:
                gap = p.server - prev.server
                stream.d_claimed += gap - p.claimed
                stream.d_wall += gap - (p.wall - prev.wall)
            stream.claimed.add(stream.d_claimed, p.server, p.step)
            stream.wall.add(stream.d_wall, p.server, p.step)
