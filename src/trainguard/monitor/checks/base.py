"""The shape of a watch check: one class per concern, one method per phase.

Like Lightning's callbacks: a check gets what it needs in its constructor
(never the guard), and each phase method returns the alerts it raised.  The
guard calls the phases in order:

* ``start``: once, when ``watch()`` begins (report what is already wrong);
* ``before_step``: in the optimizer's step pre-hook (gradients are final);
* ``after_step``: in the step post-hook (the update has been applied);
* ``step_end``: in ``guard.step`` (the loss, the batch, the step's time);
* ``close``: when the guard closes (remove hooks and wrappers).

A new check is one subclass in this package, added to the guard's list.

In budget mode a check whose cost grows with the model names its ``unit``: the
guard's :class:`~trainguard.monitor.budget.Schedule` then decides, with the
run's key, at which steps its two step hooks run; at the others the guard calls
``skipped`` instead (``step_end`` always runs).  A unit whose work starts before the
step hooks (hooks in backward), or that compares the state at two step boundaries, is
told with ``arm`` whether it runs at the next step (before this step's hooks run), and
reports work done outside its step hooks in ``outside_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainguard.monitor import safety
from trainguard.monitor.alerts import Alert, Context


@dataclass(frozen=True)
class StepEnd:
    """What ``guard.step`` knows about the finished step."""

    loss: float | None
    grad_norm: float | None
    seconds: float  # from the end of the last step to the end of this one
    batch: list[Any]  # the tensors of the batch, in a fixed order (may be empty)
    declared_lr: list[float] | None = None  # what the loop said it set (guard.step(lr=...))
    declared_reseed: bool = False
    # seconds per phase: "compute" (data, forward, backward), "optimizer", "guard"
    phases: dict[str, float] = field(default_factory=dict)
    # guard.step(changed=...): what the loop changed on purpose this step (module settings,
    # buffers, data loader objects), by name, with the value it set or only the name
    declared_changes: Any = None
    # "" for a step guard.step ended; "repeat" for one the first optimizer's next step
    # ended in its pre-hook (it stepped again before guard.step: a WGAN's critic listed
    # first).  The step-time check compares a step with steps of its own kind.
    kind: str = ""
    # Seconds of the "guard" phase blocked (wall minus CPU minus the wait for a CPU), less
    # the guard's waits by design (ledger appends, the ranks' comparison): checks/timing.py.
    guard_blocked: float = 0.0


class Check:
    """Base class: every phase does nothing unless a subclass says otherwise."""

    unit: str | None = None  # budget mode: None runs at every step, a name when scheduled
    # A check of the weights as the last step left them runs when the step is entered,
    # before a closure (``optimizer.step(closure)``): an optimizer such as SAM writes the
    # weights before it calls its closure, and the gradient checks run after it returns.
    at_entry: bool = False
    # A core check sees the weights, their update, or the code and state computing it
    # change: its failure leaves the step's weights unverified, so its first failure is
    # high (monitor/safety.py), not medium like other checks' first two.
    core: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.core:
            safety.CORE.add(cls.__name__)

    def skipped(self, ctx: Context) -> list[Alert]:
        """Budget mode: in place of both step hooks, at a step the schedule leaves out."""
        return []

    def start(self, ctx: Context) -> list[Alert]:
        return []

    def before_step(self, ctx: Context) -> list[Alert]:
        return []

    def after_step(self, ctx: Context) -> list[Alert]:
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        return []

    def arm(self, on: bool) -> None:
        """Budget mode: whether this check's unit runs at the next step (exact mode never
        calls it: armed from the start)."""
        return None

    def outside_seconds(self) -> float:
        """Seconds this check's own hooks spent outside the step hooks (in backward) since
        the last call: charged to its unit."""
        return 0.0

    def close(self) -> None:
        return None
