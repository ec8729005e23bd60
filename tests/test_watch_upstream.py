"""The gradient made wrong before the parameters (issue #12, red team s5 family 1).

Red team s5: a criterion's forward hook that puts a tensor hook on the logits (A), a
criterion forward pre-hook that rewrites labels (A2), the model's own autograd.Function
with its backward replaced (G): every check after the parameters' AccumulateGrad nodes
saw a consistently wrong gradient and passed it.

Generated compositions (seed printed; rerun one with TRAINGUARD_TEST_SEED=<seed>):

* the criterion's hooks (forward, forward pre-, full backward; acting on a random
  fraction of the batch), with ``loss_fn=`` given, installed before ``watch()`` (high at
  start-up) or at a random step (critical at that step; budget: the first step the
  ``identity`` unit runs at or after it);
* a hook put on the model's output during a step (a tensor hook by the criterion's
  forward hook or the loop, or a pre-hook on the output's node), without ``loss_fn``,
  from a random step: critical at that step (budget: the ``outputgrad`` unit's);
* the model's autograd.Function: backward, forward or apply replaced, or backward's
  code swapped, at a random step: critical there (budget: the ``identity`` unit's);

and honest twins: label smoothing, a custom Function never changed, activation
checkpointing (reentrant or not, which runs through torch's own Function), CPU autocast,
a hook on the output that only reads, ``retain_grad()``: silent.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.budget import WARMUP_STEPS  # noqa: E402

nn = torch.nn
STEPS, C = 14, 5


def make_function() -> Any:
    """A straight-through clamp, defined fresh per run (as a training script does)."""

    class Clamp(torch.autograd.Function):  # type: ignore[name-defined,misc]  # torch is Any
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.clamp(-3, 3)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g

    return Clamp


class Net(nn.Module):  # type: ignore[name-defined,misc]  # torch is importorskip-ed (Any)
    def __init__(self, fn: Any, checkpoint: str) -> None:
        super().__init__()
        self.a, self.b, self.fn, self.checkpoint = (
            nn.Linear(6, 16),
            nn.Linear(16, C),
            fn,
            checkpoint,
        )

    def forward(self, x: Any) -> Any:
        h = self.a(x)
        if self.checkpoint:
            reentrant = self.checkpoint == "reentrant"
            h = torch.utils.checkpoint.checkpoint(torch.tanh, h, use_reentrant=reentrant)
        return self.b(torch.relu(self.fn.apply(h)))


def doubled(apply: Any, h: Any) -> Any:
    return apply(h) * 2


def flipper(rng: random.Random) -> Any:
    """A gradient edit on a random fraction of the batch's rows (negate or scale)."""
    rows = torch.rand(32, generator=torch.Generator().manual_seed(rng.randrange(99))) < 0.3
    rows[rng.randrange(32)] = True
    factor = rng.choice([-1.0, 0.0, 3.0])

    def edit(g: Any) -> Any:
        return torch.where(rows.unsqueeze(1), g * factor, g)

    return edit


def run(rng: random.Random, attack: str | None) -> tuple[Any, int, str]:
    """One run: (guard, the step the attack is to be named at or -1, what it was)."""
    budget = rng.choice([None, None, 0.05])
    # Budget mode: past the warm-up (every unit runs in it), so the draws are the schedule's.
    start, steps = (1, STEPS) if budget is None else (WARMUP_STEPS, WARMUP_STEPS + 10)
    at = rng.randrange(start, steps - 2)
    before = rng.random() < 0.4  # criterion hooks: planted before watch() starts
    kind = rng.choice(["forward-tensor", "pre-labels", "backward", "forward-loss"])
    out_kind = rng.choice(["crit-forward", "loop", "node-pre"])
    fn_kind = rng.choice(["backward", "forward", "apply", "code"])
    smoothing = rng.choice([0.0, 0.1])
    checkpoint = rng.choice(["", "", "reentrant", "plain"])
    autocast = rng.random() < 0.25
    edit = flipper(rng)
    torch.manual_seed(rng.randrange(2**31))
    fn = make_function()
    model = Net(fn, checkpoint)
    crit = nn.CrossEntropyLoss(label_smoothing=smoothing)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, C, (32,))
    given = attack == "criterion" or rng.random() < 0.5

    def on_logits(m: Any, i: Any, o: Any) -> None:
        i[0].register_hook(edit)  # returns None: the loss is left as it is

    def plant_criterion() -> None:
        if kind == "forward-tensor":
            crit.register_forward_hook(on_logits)
        elif kind == "pre-labels":
            crit.register_forward_pre_hook(lambda m, a: (a[0], (a[1] + 1) % C))
        elif kind == "backward":
            crit.register_full_backward_hook(lambda m, gi, go: (edit(gi[0]), *gi[1:]))
        else:
            crit.register_forward_hook(lambda m, i, o: o * 0.1)

    if attack == "criterion" and before:
        plant_criterion()
    guard = trainguard.watch(
        model, opt, hang_seconds=None, ledger=None, budget=budget, loss_fn=crit if given else None
    )
    honest_read = rng.random() < 0.5  # an honest hook on the output that only reads
    for step in range(steps):
        if step == at and attack == "criterion" and not before:
            plant_criterion()
        if step == at and attack == "function":
            if fn_kind == "backward":
                fn.backward = staticmethod(lambda ctx, g: -g)
            elif fn_kind == "forward":
                fn.forward = staticmethod(lambda ctx, x: x.clamp(-3, 3) * 2)
            elif fn_kind == "apply":
                fn.apply = staticmethod(functools.partial(doubled, fn.apply))
            else:
                fn.backward.__code__ = (lambda ctx, g: g * -1).__code__
        if step == at and attack == "output" and out_kind == "crit-forward":
            crit.register_forward_hook(on_logits)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        if attack == "output" and step >= at and out_kind == "loop":
            out.register_hook(edit)
        elif attack == "output" and step >= at and out_kind == "node-pre":
            out.grad_fn.register_prehook(lambda gs: (edit(gs[0]), *gs[1:]))
        elif honest_read:
            out.register_hook(lambda g: None)
            out.retain_grad()
        # As an AMP loop does: the loss under autocast too (it computes cross-entropy in
        # float32 inside the dispatcher), the criterion given the model's output itself.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = crit(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
    guard.close()
    what = {"criterion": f"{kind} before={before}", "output": out_kind, "function": fn_kind}
    label = what.get(attack or "", "honest")
    print(attack, label, "at", at, "budget", budget, "loss_fn", given, checkpoint, autocast)
    if attack is None:
        return guard, -1, label
    if attack == "criterion" and before:
        return guard, 0, label  # the start-up audit, before step 0
    if guard.schedule is None:
        return guard, at, label
    # The units that see it: a tensor hook on the logits is seen by the output's check,
    # a criterion hook added mid-run (with loss_fn) by the identity check's routes.
    units = {"identity"} if attack != "output" or (given and out_kind == "crit-forward") else set()
    if attack == "output" or (attack == "criterion" and kind == "forward-tensor"):
        units.add("outputgrad")
    drawn = [s for u in units for s in guard.schedule.recent[u] if s >= at]
    return guard, min(drawn) if drawn else -1, label


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("attack", ["criterion", "output", "function"])
def test_a_gradient_made_wrong_upstream_is_named_at_its_step(attack: str) -> None:
    rng = seeded()
    for _ in range(3):
        state = rng.getstate()
        honest, _, _ = run(rng, None)
        assert high(honest) == [], [(a.rule, a.step, a.message) for a in honest.alerts]
        rng.setstate(state)
        guard, at, label = run(rng, attack)
        found = [(a.rule, a.step, a.severity, a.message[:120]) for a in high(guard)]
        if at < 0:
            continue  # budget mode: the unit drew no step after it in this short run
        assert found, (attack, label, at, guard.alerts)
        assert found[0][:2] == ("TG1304", at), (attack, label, at, found)
        if attack == "criterion" and at == 0:
            assert "loss_fn" in found[0][3] and found[0][2] == Severity.HIGH, found
        else:
            assert found[0][2] == Severity.CRITICAL, found
