"""A data loader's private generator advanced by draws the loader did not make (TG1305).

``SeedCheck`` sees a private generator *re-seeded* back to a state seen before.
The red team advanced it instead (777 numbers drawn from ``dl.generator``
mid-epoch): no seeding call, the initial seed unchanged, a state never seen
before, and a data order the attacker chose by the draw count.  The
invariant: between two step hooks, the generator's state may only move by
the draws the data loader itself makes at an epoch boundary: one int64 (the
iterator's base seed) and ``randperm(n)`` (``RandomSampler`` without
replacement: one at the first batch, one more when it runs out).  So when the
state moved, the check replays those sequences (``SEQUENCES``) from the state
it recorded last (on a clone) and, after a re-seed (a new
initial seed: loops that seed each epoch for resumable order), from the fresh
state of that seed.  No sequence reaches the state now: high.

Only loaders whose draws are known this way are checked: a ``RandomSampler``
without replacement, over at most ``MAX_N`` samples, with CPU generators.
Not told apart: foreign draws that consume exactly what one base seed does (one
int64, or two 32-bit numbers) between two hooks that see no other draw.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check

# What an epoch boundary can draw between two hooks: the sampler's last randperm (P, made
# when it runs out), the new iterator's base seed (D), its first randperm.  One D at most:
# any other number of draws is someone else's (PP: a sampler with its own generator, whose
# loader draws the base seed elsewhere).  In prefix order.
SEQUENCES = ("D", "P", "DP", "PD", "PP", "PDP")
MAX_N = 2_000_000  # randperm(n) beyond this costs too much to replay at each epoch


class DrawCheck(Check):
    def __init__(self, dataloader: Any) -> None:
        import torch

        self.torch = torch
        self.gens: dict[str, Any] = {}
        self.dataloader = dataloader
        sampler = getattr(dataloader, "sampler", None)
        known = isinstance(sampler, torch.utils.data.RandomSampler) and not sampler.replacement
        self.n = len(sampler.data_source) if known and sampler is not None else 0
        if known and 0 < self.n <= MAX_N:
            for name, g in self._resolve().items():
                if isinstance(g, torch.Generator) and g.device.type == "cpu":
                    if all(g is not other for other in self.gens.values()):
                        self.gens[name] = g
        self.last = {name: (g.get_state(), g.initial_seed()) for name, g in self.gens.items()}
        self.replayed = 0  # state changes explained by replayed draws

    def _resolve(self) -> dict[str, Any]:
        """The generators installed now, read by path from the loader (not the objects
        found at start: a swapped generator is LoaderPathCheck's to name, and this
        check then follows the one the loader uses)."""
        sampler = getattr(self.dataloader, "sampler", None)
        return {
            "dataloader.generator": getattr(self.dataloader, "generator", None),
            "dataloader.sampler.generator": getattr(sampler, "generator", None),
        }

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._check(ctx)

    def _check(self, ctx: Context) -> list[Alert]:
        alerts = []
        now = self._resolve() if self.gens else {}
        for name, g in list(self.gens.items()):
            if now.get(name) is not g and isinstance(now.get(name), self.torch.Generator):
                g = self.gens[name] = now[name]  # swapped: follow the new one from here
                self.last[name] = (g.get_state(), g.initial_seed())
            state, seed = g.get_state(), g.initial_seed()
            old_state, old_seed = self.last[name]
            self.last[name] = (state, seed)
            if self.torch.equal(state, old_state):
                continue
            starts = [old_state]
            if seed != old_seed:  # re-seeded (SeedCheck judges that): draws since the seed
                fresh = self.torch.Generator().manual_seed(seed).get_state()
                if self.torch.equal(state, fresh):
                    continue  # re-seeded and not drawn from since
                starts.append(fresh)
            if any(self._reachable(s, state) for s in starts):
                self.replayed += 1
                continue
            alerts.append(
                ctx.alert(
                    "TG1305",
                    f"the {name} random state moved by draws the data loader does not make "
                    "(no sequence of epoch-boundary draws from its last state reaches it): "
                    "the data order was chosen by someone else",
                    generator=name,
                )
            )
        return alerts

    def _reachable(self, start: Any, target: Any) -> bool:
        torch = self.torch
        draws = {"D": self._seed_draw, "P": self._perm}
        states: dict[str, Any] = {"": start}
        for seq in SEQUENCES:  # each extends a shorter one by one draw
            g = torch.Generator()
            g.set_state(states[seq[:-1]])
            draws[seq[-1]](g)
            states[seq] = g.get_state()
            if torch.equal(states[seq], target):
                return True
        return False

    def _seed_draw(self, g: Any) -> None:
        self.torch.empty((), dtype=self.torch.int64).random_(generator=g)

    def _perm(self, g: Any) -> None:
        self.torch.randperm(self.n, generator=g)
