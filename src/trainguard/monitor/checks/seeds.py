"""Random state re-seeded mid-run (TG1305); see monitor/rng.py.

The global generators (torch, Python, NumPy, CUDA) are watched for a seeding
call, a changed initial seed, or a state that returns to one seen before; the
private ones a data loader carries (its own ``generator`` and its sampler's)
for a state seen before (a new seed each epoch is how loops make their data
order resumable; going back to an earlier state replays a data order).  What
is found before a step is judged when ``guard.step`` is called, so that a loop
that re-seeds on purpose declares it (``guard.step(..., reseed=True)``).
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor import rng
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd


class SeedCheck(Check):
    def __init__(self, dataloader: Any = None) -> None:
        import torch

        self._calls: list[str] = []
        self.watch = rng.SeedWatch(self._calls.append)
        self.watch.install()
        self.initial_seed = rng.initial_seed()
        self._seen: set[tuple[str, str]] = set()
        self.digests: dict[str, str] = {}
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
        # The states at start-up count as seen: a re-seed back to them is one too.
        self.digests = self._digests()
        self._seen.update(self.digests.items())

    def _digests(self) -> dict[str, str]:
        digests = rng.state_digests()
        digests.update({name: rng.generator_digest(g) for name, g in self.private.items()})
        return digests

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        found = []
        seed = rng.initial_seed()
        calls, self._calls[:] = list(self._calls), []
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
        # A data loader's own generator re-seeded with a new seed (each epoch, for a
        # resumable data order) is ordinary; one that returns to a state seen before
        # replays a data order, and is caught below like the global ones.
        digests = self._digests()
        for name, d in digests.items():
            # An unchanged state is normal (no randomness used this step); a state
            # that moves back to one seen before is a re-seed.
            if d != self.digests.get(name) and (name, d) in self._seen:
                found.append(
                    ctx.alert(
                        "TG1305",
                        f"the {name} random state returned to an earlier state "
                        "(re-seeded with a seed used before)",
                        generator=name,
                    )
                )
            self._seen.add((name, d))
        self.digests = digests
        self._held += found
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        held, self._held = self._held, []
        return [] if end.declared_reseed else held

    def close(self) -> None:
        self.watch.uninstall()
