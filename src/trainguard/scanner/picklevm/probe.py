"""Would a pickle-based loader start executing these bytes?

``pickle.load``, ``torch.load`` (legacy files), ``joblib.load`` and
``np.load(allow_pickle=True)`` read opcodes from the first byte whatever the
file looks like: no header, no magic number, no protocol is required.  So the
question "is this a pickle?" is answered the way the loader answers it, by
running the symbolic machine over the first opcodes, never by magic numbers:

- ``EXECUTES``: before the stream ends or breaks, the loader imports a name a
  real import could resolve, computes one, or fetches a registered extension:
  attacker code can run.
- ``ACCEPTS``: the stream reaches STOP having imported nothing (plain data).
- ``UNDECIDED``: the window ended (or a bound was hit) before either; only the
  whole stream can tell.
- ``REJECTS``: the loader fails before doing anything.

A malformed global (an empty or non-identifier module) is not execution: the
real ``find_class`` fails to import it before any code of the file runs.
"""

from __future__ import annotations

import enum

from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.scanner.picklevm.machine import PickleEvents, PickleMachine
from trainguard.scanner.stream import ByteStream


class Probe(enum.Enum):
    EXECUTES = "executes"
    ACCEPTS = "accepts"
    UNDECIDED = "undecided"
    REJECTS = "rejects"


def _importable(dotted: str) -> bool:
    return bool(dotted) and all(part.isidentifier() for part in dotted.split("."))


def executes(ev: PickleEvents) -> bool:
    """True if the events include something a loader would import or resolve."""
    if ev.dynamic_globals or ev.extensions:
        return True
    return any(_importable(g.module) and _importable(g.name) for g in ev.globals)


def verdict(ev: PickleEvents, *, window_complete: bool) -> Probe:
    """What a loader does with the stream the events came from.

    ``window_complete`` says whether the machine saw the whole stream (False for
    a head window: a break at its end is the window's, not the data's).
    """
    if executes(ev):
        return Probe.EXECUTES
    if ev.end is not None:
        return Probe.ACCEPTS
    if ev.limit is not None:
        return Probe.UNDECIDED
    if not window_complete and (ev.error or "").startswith("truncated"):
        return Probe.UNDECIDED
    return Probe.REJECTS


def probe_head(head: bytes, *, complete: bool, limits: Limits = DEFAULT_LIMITS) -> Probe:
    """The verdict on the first bytes of a stream (``complete``: they are all of it)."""
    if not head:
        return Probe.REJECTS
    ev = PickleMachine(ByteStream.of_bytes(head), limits).run()
    return verdict(ev, window_complete=complete)


def probe_stream(
    stream: ByteStream, limits: Limits = DEFAULT_LIMITS, deadline: float | None = None
) -> Probe:
    """The verdict on a whole stream from its current position (bounded by ``limits``)."""
    ev = PickleMachine(stream, limits, deadline).run()
    return verdict(ev, window_complete=True)
