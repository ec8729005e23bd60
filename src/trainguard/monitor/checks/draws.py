"""A data loader's private generator moved by anything but the loader's draws (TG1305).

``SeedCheck`` sees a private generator *re-seeded* back to a state seen before.
The red team advanced it instead (777 numbers drawn from ``dl.generator``
mid-epoch: a data order chosen by the draw count), and then re-seeded it to a
fresh seed ground for a class-skewed order (A13a): no state seen before.  The
invariant: between two step hooks, a private generator's state may only move
by the draws the data loader itself makes at an epoch boundary: one int64 (the
iterator's base seed) and ``randperm(n)`` (``RandomSampler`` without
replacement: one at the first batch, one more when it runs out).  So when the
state moved, the check replays those sequences (``SEQUENCES``) from the state
it recorded last (on a clone).  No sequence reaches the state now: high.

A re-seed (a new initial seed) is no draw the loader makes: its seed picks the
order of every epoch after it (the red team ground one among 200 for a
class-skewed order), so it is high too, for any private generator whatever its
sampler, unless the loop declares it (``guard.step(..., reseed=True)``) or it
leaves the attacker no choice of seed: the seed a loop sets before its first
step (observed at the first watched step), and the last seed plus one (the
resumable order docs/replay.md describes: ``generator.manual_seed(base +
epoch)`` at each epoch).  Other seed schedules declare their re-seeds.  What
a step's hooks find is held to its ``guard.step``, so a declared re-seed is
dropped there, and the state then is the new baseline.

The draws are replayed only for loaders whose draws are known this way: a
``RandomSampler`` without replacement, over at most ``MAX_N`` samples, or a
``SequentialSampler`` (base seeds only), with CPU generators; other samplers'
generators are held to their seed only (a re-seed to the seed they had, with
no state seen before, is not seen there).
Not told apart: foreign draws that consume exactly what one base seed does (one
int64, or two 32-bit numbers) between two hooks that see no other draw.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd

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
        # Replayed draws need a known sampler (a SequentialSampler draws nothing: only the
        # iterators' base seeds); every private generator is held to its seed.
        sequential = isinstance(sampler, torch.utils.data.SequentialSampler)
        self.letters = "DP" if known and 0 < self.n <= MAX_N else "D" if sequential else ""
        self.replay = bool(self.letters)
        for name, g in self._resolve().items():
            if isinstance(g, torch.Generator) and g.device.type == "cpu":
                if all(g is not other for other in self.gens.values()):
                    self.gens[name] = g
        self.last = {name: (g.get_state(), g.initial_seed()) for name, g in self.gens.items()}
        self._held: list[Alert] = []  # to this step's guard.step: a declared re-seed drops them
        self._first: int | None = None  # the first watched step (its re-seed sets the seed)
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
        self._held += self._check(ctx)
        return []

    def after_step(self, ctx: Context) -> list[Alert]:
        self._held += self._check(ctx)
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        # Read here too: a change made after the step hooks is seen at this step's end, so
        # a re-seed the loop makes just before guard.step(reseed=True) is the one declared.
        self._held += self._check(ctx)
        held, self._held = self._held, []
        return [] if end.declared_reseed else held

    def _check(self, ctx: Context) -> list[Alert]:
        alerts = []
        if self._first is None:
            self._first = ctx.step
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
            if seed != old_seed:  # a re-seed: no draw of the loader's
                # The loop's own seed (before training) or the next epoch's (seed + 1): no
                # seed an attacker picks; draws since it are then held to the replay below.
                if ctx.step != self._first and seed != old_seed + 1:
                    alerts.append(
                        ctx.alert(
                            "TG1305",
                            f"the {name} was re-seeded mid-run ({old_seed} -> {seed}): its "
                            "seed chooses the data order of every epoch after it, and the loop "
                            "declared no re-seed (guard.step(..., reseed=True))",
                            generator=name,
                            old_seed=old_seed,
                            new_seed=seed,
                        )
                    )
                    continue
                starts = [self.torch.Generator().manual_seed(seed).get_state()]
                if self.torch.equal(state, starts[0]):
                    continue  # re-seeded and not drawn from since
            if not self.replay:
                continue  # draws of an unknown sampler: held to the seed only
            if self._reachable(starts[0], state):
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
            if not set(seq) <= set(self.letters):
                continue  # a draw this sampler does not make (its extensions too)
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
