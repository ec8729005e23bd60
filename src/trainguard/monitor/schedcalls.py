"""The calls a learning-rate scheduler's ``step`` gets: arguments and call site.

The guard recomputes the schedule on its own copy (monitor/schedule.py).  Counting
how far the real scheduler's ``last_epoch`` moved and stepping the copy as often is
wrong twice over: a loop may pass the step an argument (torch documents
``CosineAnnealingWarmRestarts.step(epoch + i / iters)``, ``ReduceLROnPlateau.step(metric)``),
and a counter can be written without a step (``last_epoch`` rewound, or moved one
ahead), which the count then follows.  So each watched scheduler's own ``step`` is
observed: every call is logged with its arguments and the place it was called from,
and the copy replays exactly those calls, in the order they came, across all the
schedulers of one optimizer (two on one optimizer compose as torch composes them:
each computes from the rate the other left in the param group).

How: the scheduler's class is swapped for a subclass of it made for this scheduler
alone, whose ``step`` logs and then calls the class's own.  Not an instance attribute:
torch's ``state_dict()`` returns the instance ``__dict__``, so a wrapper there would
be saved in every checkpoint.  The subclass keeps the class's name, module and
``isinstance``; pickling and ``copy.deepcopy`` rebuild the original class.  Only a
call from outside every observed step is logged (``SequentialLR`` stepping a child
that is also watched is one call, the outer one).  ``release`` puts the class back.

A scheduler whose class cannot be swapped (a class with ``__slots__`` of its own, an
extension type) is not observed: the copy then catches up by the count, as before.
"""

from __future__ import annotations

import copyreg
import sys
from dataclasses import dataclass, field
from typing import Any

MAX_PENDING = 100_000  # calls logged between two replays at most (then: overflowed)
SITE_FRAMES = 2  # frames that name where a step call came from


Site = tuple[tuple[str, int], ...]  # the caller's file and line, and its caller's


@dataclass(frozen=True)
class Call:
    which: int  # the scheduler's index among those of its optimizer
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    site: Site


@dataclass
class CallLog:
    """Calls not yet replayed (``pending``) and calls since the last ``guard.step``
    (``recent``, for the cadence check); ``overflowed`` when more came than it holds."""

    pending: list[Call] = field(default_factory=list)
    recent: list[Call] = field(default_factory=list)
    overflowed: bool = False
    closed: bool = False
    depth: int = 0  # inside an observed step: nested calls are that step's own

    def add(self, call: Call) -> None:
        if self.closed:
            return
        if len(self.pending) >= MAX_PENDING or len(self.recent) >= MAX_PENDING:
            self.overflowed = True
            return
        self.pending.append(call)
        self.recent.append(call)

    def take(self) -> list[Call]:
        out, self.pending = self.pending, []
        return out

    def take_recent(self) -> list[Call]:
        out, self.recent = self.recent, []
        return out


def _value(v: Any) -> Any:
    """An argument as it was at the call: a tensor (a metric) is copied."""
    if hasattr(v, "detach") and hasattr(v, "clone"):
        return v.detach().clone()
    return v


def _site(frame: Any) -> tuple[tuple[str, int], ...]:
    """Where a call came from: its caller and the caller's caller (a loop's own helper,
    ``def step_schedulers(): sched.step()``, called from somewhere new is somewhere new)."""
    out: list[tuple[str, int]] = []
    while frame is not None and len(out) < SITE_FRAMES:
        out.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return tuple(out)


def observe(scheduler: Any, log: CallLog, which: int) -> bool:
    """Log every ``scheduler.step`` call in ``log``; False when it cannot be observed."""
    original = type(scheduler)
    step = getattr(original, "step", None)
    if not callable(step):
        return False

    def logged_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if log.depth == 0:
            site = _site(sys._getframe(1))
            log.add(
                Call(
                    which,
                    tuple([_value(a) for a in args]),
                    {k: _value(v) for k, v in kwargs.items()},
                    site,
                )
            )
        log.depth += 1
        try:
            return step(self, *args, **kwargs)
        finally:
            log.depth -= 1

    def reduce_ex(self: Any, protocol: Any) -> Any:
        # Rebuilt as the original class: a checkpoint or deep copy holds no trace of us.
        parts = original.__reduce_ex__(self, protocol)  # type: ignore[call-arg]
        if not isinstance(parts, tuple):
            return parts
        return (copyreg._reconstructor, (original, object, None), *parts[2:])  # type: ignore[attr-defined]

    namespace = {
        "step": logged_step,
        "__reduce_ex__": reduce_ex,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__slots__": (),
        "_trainguard_original": original,
    }
    try:
        maker: Any = type(original)  # the class's own metaclass
        observed = maker(original.__name__, (original,), namespace)
        scheduler.__class__ = observed
    except TypeError:  # a layout or metaclass that refuses: counted instead
        return False
    return True


def original_class(scheduler: Any) -> type:
    """The scheduler's own class, with or without the observing subclass."""
    cls = type(scheduler)
    return vars(cls).get("_trainguard_original", cls)  # type: ignore[no-any-return]


def release(scheduler: Any) -> None:
    """Put the scheduler's class back (only ours: a later swap on top stays)."""
    cls = type(scheduler)
    original = vars(cls).get("_trainguard_original")
    if original is not None:
        try:
            scheduler.__class__ = original
        except TypeError:  # pragma: no cover - the swap the other way worked
            pass
