"""Random state re-seeded mid-run (TG1305); see monitor/rng.py."""

from __future__ import annotations

from trainguard.monitor import rng
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class SeedCheck(Check):
    def __init__(self) -> None:
        self._calls: list[str] = []
        self.watch = rng.SeedWatch(self._calls.append)
        self.watch.install()
        self.initial_seed = rng.initial_seed()
        self._seen: set[tuple[str, str]] = set()
        self.digests: dict[str, str] = {}

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        alerts = []
        seed = rng.initial_seed()
        calls, self._calls[:] = list(self._calls), []
        if seed != self.initial_seed or calls:
            parts = []
            if seed != self.initial_seed:
                parts.append(f"torch initial seed {self.initial_seed} -> {seed}")
            if calls:
                parts.append(f"called: {'; '.join(calls)}")
            alerts.append(
                ctx.alert(
                    "TG1305",
                    f"random state re-seeded mid-run ({'; '.join(parts)})",
                    old_seed=self.initial_seed,
                    new_seed=seed,
                    calls=calls,
                )
            )
            self.initial_seed = seed
        digests = rng.state_digests()
        for name, d in digests.items():
            # An unchanged state is normal (no randomness used this step); a state
            # that moves back to one seen before is a re-seed.
            if d != self.digests.get(name) and (name, d) in self._seen:
                alerts.append(
                    ctx.alert(
                        "TG1305",
                        f"the {name} random state returned to an earlier state "
                        "(re-seeded with a seed used before)",
                        generator=name,
                    )
                )
            self._seen.add((name, d))
        self.digests = digests
        return alerts

    def close(self) -> None:
        self.watch.uninstall()
