"""How a rank's run-end count must relate to its step records: one rule for every reader.

A guard writes one step record per step, then counts the step (monitor/guard.py:
the record, then ``recorder.step_done``, then ``step_index += 1``).  A step
interrupted between its record and its count (Ctrl-C, a peer's timeout in the
rank comparison) leaves one record more than the run-end counts, and is honest;
fewer records than counted, or two or more beyond the count, are not.

`trainguard ledger verify` (ledger/ends.py, TG1215), verify-run's coverage
(explain/verifier/coverage.py, TG1514) and its clock (explain/verifier/clock.py)
all judge a run-end through :func:`end_count`, so a run one of them accepts is
never an alarm in another.
"""

from __future__ import annotations

from dataclasses import dataclass

# Records a step can leave beyond the run-end's count when it is interrupted: one, the
# record of the step that was never counted.
INTERRUPTED_RECORDS = 1


@dataclass(frozen=True)
class EndCount:
    """A run-end's count held to the step records ``0 .. recorded - 1``."""

    claimed: int  # the run-end's "steps"
    recorded: int  # one past the last step record (0: none)

    @property
    def holds(self) -> bool:
        """The count is the records', or one less (an interrupted step)."""
        return self.claimed <= self.recorded <= self.claimed + INTERRUPTED_RECORDS

    @property
    def interrupted(self) -> int | None:
        """The step whose record was written but never counted, if there is one."""
        return self.claimed if self.recorded == self.claimed + INTERRUPTED_RECORDS else None


def end_count(claimed: int, recorded: int) -> EndCount:
    """Judge a run-end that counts ``claimed`` steps on a stream whose step records reach
    ``recorded`` (one past the last)."""
    return EndCount(claimed, recorded)
