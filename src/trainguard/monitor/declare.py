"""What the training loop declares it does on purpose, and how the guard records it.

``with guard.outside_step("sam"):`` wraps code that legitimately writes the
weights between two optimizer steps: SAM's ascent and restore, Lookahead's pull
towards the slow weights, a re-projection.  On entry nothing may have changed
since the last step (so an honest block cannot launder an earlier edit: that is
still TG1301/TG1302); on exit the state written becomes the one the next step
must start from.  The block itself is the evidence: an ``outside-step`` ledger
record (the reason, the tensors that changed, the parameters' digest after it in
exact mode) and a TG1316 alert (low), so a replay or a verifier sees every
declared write, and whoever reads the run sees that weights moved outside the
optimizer, by whose declaration.

The declaration is not a proof: code that can write weights can also declare
them.  It turns a silent write into a recorded one and leaves every other write
an alert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainguard.monitor import clock
from trainguard.monitor.alerts import Context

MAX_NAMED = 200  # tensors listed per outside-step record


@contextmanager
def outside_step(guard: Any, reason: str) -> Iterator[None]:
    started = clock.now()
    ctx = Context(guard.step_index, guard.rank)
    guard.sink.raise_all(guard.tamper.enter_outside(ctx))
    lanes = getattr(guard, "lanes", [])  # further optimizers (monitor/optimizers.py)
    for lane in lanes:
        guard.sink.raise_all(lane.enter_outside(ctx))
    # Checks that compare weights at forwards (checks/transient.py): the block's are its own.
    declared = [c for c in guard.checks if hasattr(c, "outside_block")]
    for check in declared:
        check.outside_block(True)
    guard._overhead += clock.now() - started
    try:
        yield
    finally:
        started = clock.now()
        for check in declared:
            check.outside_block(False)
        changed, digest = guard.tamper.leave_outside()
        theirs = {lane.label: lane.leave_outside() for lane in lanes}
        payload: dict[str, Any] = {
            "reason": reason,
            "tensors": changed[:MAX_NAMED],
            "count": len(changed),
            # After the optimizer's step and before guard.step (Lookahead): the window's
            # weights, not the step record's "after", are the state the next step starts
            # from, and what a checkpoint saved now holds (replay reads it so).
            "after_update": guard._pending is not None,
        }
        if digest:
            after = guard.tamper.after
            payload["after"] = digest
            payload["plain"] = {"after": after.plain}
            if guard.tamper.tensor_digests:
                payload["tensors_after"] = after.compact()
        if theirs:  # the record's own fields are the first optimizer's
            payload["optimizers"] = {
                label: {"tensors": w["tensors"][:MAX_NAMED], "after": w["after"]}
                for label, w in theirs.items()
            }
            changed = changed + [n for w in theirs.values() for n in w["tensors"]]
        guard._record("outside-step", payload)
        if changed:
            message = (
                f"{len(changed)} tensor(s) written outside the optimizer step, declared "
                f"with guard.outside_step({reason!r}): {', '.join(changed[:5])}"
            )
            # Grouped by the reason (one alert per window and reason; the ledger record
            # of each block names its tensors).
            guard.sink.raise_all([ctx.alert("TG1316", message, written=changed[:50], key=reason)])
        guard._overhead += clock.now() - started
