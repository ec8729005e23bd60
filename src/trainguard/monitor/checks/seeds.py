"""Random state re-seeded mid-run (TG1305); see monitor/rng.py.

The global generators (torch, Python, NumPy, CUDA) are watched for a seeding
call, a changed initial seed, or a state that returns to one seen before; the
private ones a data loader carries (its own ``generator`` and its sampler's)
for a state seen before (a new seed each epoch is how loops make their data
order resumable; going back to an earlier state replays a data order).  What
is found before a step is judged when ``guard.step`` is called, so that a loop
that re-seeds on purpose declares it (``guard.step(..., reseed=True)``).  A seeding
call whose generators are put back to the very states they held before it (inside
``torch.random.fork_rng()``) is dropped when they are (monitor/rng.py).

In budget mode the states' digests (hashing every generator's state) and the
initial seed are a scheduled unit; the seeding calls the watch caught are read at
every step (a list, empty but for a call).  At
a declared re-seed whose step the digests skipped, the states seen now become
the new baseline, so a later check does not take the declared re-seed for one.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor import rng
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd


class SeedCheck(Check):
    unit = "seeds"

    def __init__(self, dataloader: Any = None) -> None:
        import torch

        self._calls: list[rng.Seeding] = []
        self.watch = rng.SeedWatch(self._calls.append, self._restored)
        self.watch.install()
        self.initial_seed = rng.initial_seed()
        self._seen: set[tuple[str, str]] = set()
        self._states: dict[str, str] = {}  # the states' digests when last read
        self.private: dict[str, Any] = {}
        for where in ("generator", "sampler.generator", "batch_sampler.sampler.generator"):
            obj: Any = dataloader
            for part in where.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Generator) and all(
                obj is not g for g in self.private.values()
            ):
                self.private[f"dataloader.{where}"] = obj
        self._held: list[Alert] = []
        self._read = False  # whether this step's hook read the states' digests
        # The states at start-up count as seen: a re-seed back to them is one too.
        self._states = self._digests()
        self._seen.update(self._states.items())

    @property
    def digests(self) -> dict[str, str]:
        """The states' digests read at this step (for its record), or {} at a step the
        budget's schedule left them out: a stale digest would read as a changed state."""
        return self._states if self._read else {}

    def _digests(self) -> dict[str, str]:
        digests = rng.state_digests()
        digests.update({name: rng.generator_digest(g) for name, g in self.private.items()})
        return digests

    def _restored(self) -> None:
        """A generator's state was set: a seeding call whose generators are all back to
        the states they held before it (``torch.random.fork_rng()``) changed nothing."""
        if self._calls:
            self._calls[:] = [s for s in self._calls if not rng.undone(s)]

    def skipped(self, ctx: Context) -> list[Alert]:
        # The seeding calls the watch caught (an empty list read: nothing to do), at every
        # step; the initial seed, which persists, at the drawn ones (before_step).
        if self._calls:
            self._held += self._calls_and_seed(ctx)
        self._read = False
        return []

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        found = self._calls_and_seed(ctx)
        # A data loader's own generator re-seeded with a new seed (each epoch, for a
        # resumable data order) is ordinary; one that returns to a state seen before
        # replays a data order, and is caught below like the global ones.
        digests = self._digests()
        for name, d in digests.items():
            # An unchanged state is normal (no randomness used this step); a state
            # that moves back to one seen before is a re-seed.
            if d != self._states.get(name) and (name, d) in self._seen:
                found.append(
                    ctx.alert(
                        "TG1305",
                        f"the {name} random state returned to an earlier state "
                        "(re-seeded with a seed used before)",
                        generator=name,
                    )
                )
            self._seen.add((name, d))
        self._states = digests
        self._held += found
        self._read = True
        return []

    def _calls_and_seed(self, ctx: Context) -> list[Alert]:
        """Seeding calls since the last hook, and a changed initial seed (cheap)."""
        found = []
        seed = rng.initial_seed()
        calls, self._calls[:] = [s.call for s in self._calls], []
        if seed != self.initial_seed or calls:
            parts = []
            if seed != self.initial_seed:
                parts.append(f"torch initial seed {self.initial_seed} -> {seed}")
            if calls:
                parts.append(f"called: {'; '.join(calls)}")
            found.append(
                ctx.alert(
                    "TG1305",
                    f"random state re-seeded mid-run ({'; '.join(parts)})",
                    old_seed=self.initial_seed,
                    new_seed=seed,
                    calls=calls,
                )
            )
            self.initial_seed = seed
        return found

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        held, self._held = self._held, []
        if end.declared_reseed and not self._read:
            # Declared, and not read at this step's hook: the states now are the baseline.
            self._calls_and_seed(ctx)
            self._states = self._digests()
            self._seen.update(self._states.items())
            self._read = True
        return [] if end.declared_reseed else held

    def after_record(self) -> None:
        """The step's record is written: the next step's digests are not read yet."""
        self._read = False

    def close(self) -> None:
        self.watch.uninstall()
