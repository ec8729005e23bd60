"""Several optimizers: each one's step reads weights the others own (TG1301).

Each optimizer's weights are compared at its own step boundaries (tamper.py):
after its step and before its next one.  Between the two, another optimizer
steps, and that step's forward and backward read these weights too: a GAN's
generator trains through the discriminator.  An edit made right after the
discriminator's step and put back before its next one (red team 2 #5: the
discriminator negated through ``.data``, which leaves the version counter alone)
passes the discriminator's own boundaries while the generator learns from the
edited one.  So at every optimizer's step pre-hook, every parameter another
optimizer owns (and those no optimizer owns) must be as its owner's last step
left them, by the same means the owner's boundary uses: full fingerprints in
exact mode, version counters and the owner's held chunk sample in budget mode.

Not checked here: an edit put back before the reading optimizer's step hook
(between its backward and its step), which only a check at each forward's start
would see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class PeerCheck(Check):
    """At the step hook of optimizer ``here``: the weights of ``others`` (their labels and
    tamper checks) as their last steps left them.  ``tag`` names each alert's owner."""

    core = True  # its failure leaves the step unverified: high at once (safety.py)

    at_entry = True  # the others' weights as their last steps left them

    def __init__(
        self, here: str, others: list[tuple[str, Any]], tag: Callable[[list[Alert]], list[Alert]]
    ) -> None:
        self.here, self.others, self.tag = here, others, tag

    def before_step(self, ctx: Context) -> list[Alert]:
        found = []
        for _, tamper in self.others:
            for a in tamper.unchanged(ctx):
                found.append(
                    dataclasses.replace(
                        a,
                        message=f"{a.message}; found before {self.here}'s step, which reads them",
                        evidence={**a.evidence, "read_by": self.here},
                    )
                )
        return self.tag(found)
