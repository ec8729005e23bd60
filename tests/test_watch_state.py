"""Issue 12, red team families state_2 and update_partial_1: sabotage inside the optimizer
step that leaves the update's size alone: the optimizer's state scaled a little at every
step, or the update flipped on a small secret share of every tensor.

The patch is installed *before* watch() starts (so the surface check's identity baseline
includes it and only the behaviour can give it away), on torch.Tensor's in-place methods,
and acts on the optimizer's own tensors from a random step.  Each run picks the optimizer,
the attack, its size and the step at random (seed printed; TRAINGUARD_TEST_SEED reruns).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

IN_PLACE = ("add_", "mul_", "addcmul_", "addcdiv_", "lerp_", "div_", "sub_", "copy_")
STATEFUL = ["sgd", "nesterov", "adam", "adamw", "amsgrad", "rmsprop", "rmsprop-momentum"]
STATEFUL += ["adagrad", "adadelta", "adamax", "nadam", "radam"]


class Saboteur:
    """Wraps torch.Tensor's in-place methods; harmless until ``arm`` names its targets."""

    def __init__(self, kind: str, size: float, seed: int) -> None:
        self.kind, self.size, self.seed = kind, size, seed
        self.targets: dict[int, Any] = {}  # id -> secret mask (flip) or None (scale)
        self.busy = False
        self.undo: list[Callable[[], None]] = []

    def install(self) -> None:
        for name in IN_PLACE:
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(original))
            self.undo.append(functools.partial(delattr, torch.Tensor, name))

    def remove(self) -> None:
        for u in self.undo:
            u()

    def arm(self, opt: Any) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for group in opt.param_groups:
            for p in group["params"]:
                if self.kind == "flip":
                    self.targets[id(p)] = torch.rand(p.shape, generator=gen) < self.size
                else:
                    for v in opt.state[p].values():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            self.targets[id(v)] = None

    def _wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(t: Any, *a: Any, **k: Any) -> Any:
            if self.busy or id(t) not in self.targets:
                return original(t, *a, **k)
            self.busy = True
            try:
                with torch.no_grad():
                    before = t.detach().clone()
                    result = original(t, *a, **k)
                    mask = self.targets[id(t)]
                    if mask is None:
                        t.mul_(1 + self.size)  # the state drifts: the effective lr falls
                    else:
                        t[mask] = (2 * before - t)[mask]  # this share climbs the loss
                return result
            finally:
                self.busy = False

        return wrapper


def _arm_at(at: int, saboteur: Saboteur, step: int, model: Any, opt: Any) -> None:
    if step == at:
        saboteur.arm(opt)


def test_state_poisoned_or_a_small_share_flipped_inside_the_step_is_high() -> None:
    rng = seeded()
    for _ in range(3):
        name = rng.choice(STATEFUL)
        kind = rng.choice(["scale", "flip"])
        size = rng.uniform(0.15, 0.5) if kind == "scale" else rng.uniform(0.03, 0.1)
        at = rng.randrange(3, 12)
        clean = [p.detach().clone() for p in sc.run(at + 8, optimizer=name).model.parameters()]
        saboteur = Saboteur(kind, size, rng.randrange(2**31))
        saboteur.install()
        try:
            patch = functools.partial(_arm_at, at, saboteur)
            guard = sc.run(at + 8, optimizer=name, sabotage=patch)
        finally:
            saboteur.remove()
        alerts = [(a.rule, a.step, a.severity.name, a.message[:140]) for a in guard.alerts]
        print(name, kind, round(size, 3), at, alerts)
        after = [p.detach() for p in guard.model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(clean, after, strict=True))
        found = [
            a.step
            for a in guard.alerts
            if a.rule == "TG1306" and a.severity >= Severity.HIGH and a.step > at
        ]
        # Armed after guard.step of step `at`: the sabotage acts from step at + 1.
        assert found and found[0] <= at + 3, (name, kind, size, at, alerts)
        early = [a for a in guard.alerts if a.severity >= Severity.HIGH and a.step <= at]
        assert early == [], early


def test_honest_state_matches_the_models_of_every_optimizer() -> None:
    rng = seeded()
    for name in rng.sample(STATEFUL, 4):
        guard = sc.run(30, optimizer=name, scheduler=rng.random() < 0.5)
        assert [a for a in guard.alerts if a.severity >= Severity.HIGH] == [], name
        state = next(c for c in guard.checks if type(c).__name__ == "StateModelCheck")
        assert state.compared > 0, name  # it did compare state, not only skip it
