"""A global random generator set to a state it cannot have reached (TG1305).

torch's CPU generator first; Python's ``random`` and NumPy's legacy global
generator (the same Mersenne Twister) the same way (``OtherGenerators``).

``SeedCheck`` sees seeding calls, a changed initial seed and a state seen
before.  ``torch.default_generator.set_state(forged)`` with the forged state's
initial-seed field copied from the real one shows none of these, and every
dropout mask after it is the forger's.  The invariant: a generator only moves
forward.  The state at each optimizer step must be the state at the previous
step advanced by ``k`` draws (monitor/mt19937.py finds ``k`` by drawing what the
step drew, on a clone); after a re-seed (a new initial seed, which SeedCheck
judges) it must be the fresh state of that seed advanced.  None found: high.

The search is bounded: ``max(MIN_BOUND, GROWTH x`` the largest advance seen in
an honest step so far``)`` draws.  A foreign state costs one full search
(about 40 ms for 2**22 draws on one CPU core); an honest step costs about
what it spent drawing, less for few draws (tens of microseconds).  In budget
mode it is the schedule's unit ``rng_advance``: at the steps it leaves out only
the state is kept (a 5 KB copy), so each checked step compares one step's
advance.

The draw count itself is evidence too: an attacker can also advance the
generator by draws of their choosing ("mask grinding"), which every check
above accepts.  Honest loops change the count now and then (a data loader
without its own generator draws its base seed, and a RandomSampler its seed,
at each epoch; a last partial batch; an evaluation pass that samples), so one
other count is not news.  When the first ``WARMUP`` steps all drew the same
number and ``VARYING`` other counts then appear among the last ``RECENT``
steps, the count varies from step to step as grinding makes it: medium.
Not told apart: grinding by a constant number of extra draws (it reads as a
changed loop), grinding from the first steps, and any count when shapes vary
from the start (per-element dropout over variable sequence lengths): the
verifier, which replays each step's draws, is what catches those.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import mt19937
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd

MIN_BOUND = 1 << 22  # draws searched at least (a foreign state costs this much once)
GROWTH = 16  # the search reaches this many times the largest honest step's draws
WARMUP = 3  # steps (after step 0) whose draw counts decide whether the count is steady
RECENT, VARYING = 8, 4  # this many other counts among the last RECENT steps: varying


class AdvanceCheck(Check):
    unit = "rng_advance"

    def __init__(self) -> None:
        import torch

        self.gen = torch.default_generator
        self.last: Any = self.gen.get_state()  # None: this boundary was not taken
        self._next = True  # budget mode: whether the unit runs at the next step (arm)
        self.usable = mt19937.parse(self.last) is not None  # a layout this module knows
        self.largest = 0
        self.counts: list[int] = []  # draws per checked step during warm-up
        self.steady: int | None = None
        self.recent: deque[int] = deque(maxlen=RECENT)  # draw counts after the warm-up
        self.checked = 0
        self._first = True  # step 0 also draws what a loop draws once (a loader's base seed)
        self._held: list[Alert] = []
        self.others = OtherGenerators()

    def arm(self, on: bool) -> None:
        self._next = on

    def skipped(self, ctx: Context) -> list[Alert]:
        # The next checked step compares one step's draws: its first boundary is taken at
        # the step before it (the schedule's draw for the next step is known here), not
        # at every skipped step (three generator states copied: most of this unit's
        # cost when it is rare).
        if self._next:
            self.last = self.gen.get_state()
            self.others.keep()
        else:
            self.last = None
        return []

    def before_step(self, ctx: Context) -> list[Alert]:
        if self.last is None:  # the boundary before was not taken: take this one
            self.last = self.gen.get_state()
            self.others.keep()
            return []
        self._held += self.others.check(ctx)
        if not self.usable:
            return []
        now = self.gen.get_state()
        before, self.last = self.last, now
        bound = max(MIN_BOUND, GROWTH * self.largest)
        k = mt19937.advance(before, now, bound)
        if k is None:
            seed = int(self.gen.initial_seed())
            k = mt19937.advance(mt19937.fresh(seed), now, bound)
            if k is not None:  # re-seeded, then drew k: SeedCheck judges the seeding
                return []
        self.checked += 1
        if k is None:
            self._held.append(
                ctx.alert(
                    "TG1305",
                    "torch's global random state was set to a state it cannot reach by drawing "
                    f"(not within {bound} draws of the last step's state, nor of a fresh seed): "
                    "the random numbers from here on (dropout masks, sampling) are someone "
                    "else's choice",
                    generator="torch",
                    searched=bound,
                )
            )
            return []
        self.largest = max(self.largest, k)
        return self._count(ctx, k)

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        # Held to here: a re-seed the loop declares (guard.step(reseed=True)) is no foreign
        # state, and Python's and NumPy's states carry no initial seed to tell it by.
        held, self._held = self._held, []
        return [] if end.declared_reseed else held

    def _count(self, ctx: Context, k: int) -> list[Alert]:
        if self._first:
            self._first = False
            return []
        if len(self.counts) < WARMUP:
            self.counts.append(k)
            if len(self.counts) == WARMUP and len(set(self.counts)) == 1:
                self.steady = k
            return []
        if self.steady is None:
            return []
        self.recent.append(k)
        other = sorted(set(self.recent) - {self.steady})
        if len(other) < VARYING:
            return []  # an epoch boundary, a last partial batch, an evaluation pass: once
        return [
            ctx.alert(
                "TG1305",
                f"the number of draws from torch's global generator varies from step to step "
                f"({len(other)} other counts in the last {len(self.recent)} steps: "
                f"{', '.join(map(str, other[:6]))}) where the first steps drew {self.steady} "
                "each: extra draws choose the random numbers a step uses (or the loop changed)",
                severity=Severity.MEDIUM,
                generator="torch",
                draws=other[:50],
                steady=self.steady,
            )
        ]


class OtherGenerators:
    """Python's ``random`` and NumPy's legacy global generator: the same Mersenne Twister,
    held to the same invariant (no draw count judged: a loop's augmentation varies it)."""

    def __init__(self) -> None:
        import random

        self.gens: dict[str, tuple[Any, Any]] = {
            "python": (random.getstate, mt19937.python_advance)
        }
        try:
            import numpy as np

            self.gens["numpy"] = (np.random.get_state, mt19937.numpy_advance)
        except ImportError:
            pass
        self.last = {name: get() for name, (get, _) in self.gens.items()}
        self.largest = dict.fromkeys(self.gens, 0)

    def keep(self) -> None:
        self.last = {name: get() for name, (get, _) in self.gens.items()}

    def check(self, ctx: Context) -> list[Alert]:
        alerts = []
        for name, (get, advance) in self.gens.items():
            now = get()
            before, self.last[name] = self.last[name], now
            bound = max(MIN_BOUND, GROWTH * self.largest[name])
            k = advance(before, now, bound)
            if k is not None:
                self.largest[name] = max(self.largest[name], k)
                continue
            alerts.append(
                ctx.alert(
                    "TG1305",
                    f"the {name} global random state was set to a state it cannot reach by "
                    f"drawing (not within {bound} draws of the last step's state): re-seeded "
                    "or replaced",
                    generator=name,
                    searched=bound,
                )
            )
        return alerts
