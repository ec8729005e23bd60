"""Several optimizers: each one's step reads the weights the others own (checks/peers.py).

Red team 2 #5: a GAN's discriminator negated through ``.data`` right after its own step
and put back after ``guard.step``: the generator trained through the edited
discriminator, and neither optimizer's own boundaries saw it.  Generated: a composition
of tests/test_watch_optimizers.py (2 or 3 optimizers, periods, repeats, order, exact or
budget mode), an optimizer whose weights are edited right after its last step of a drawn
step while another optimizer steps after it, and put back after ``guard.step``; the edit
drawn among a sign flip, a scale and noise through ``.data`` (exact mode: the version
counter does not move), an in-place write and a storage swap (budget mode reads version
counters and storage; a ``.data`` write there is found only when the chunk sample holds it).
The run must name the edited optimizer at high or above at that step, and nothing before.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tests.seeds import seeded
from tests.test_watch_optimizers import Net, build, draw, high
from trainguard.monitor import guard as tgw

STEPS = 14
EDITS = {
    "data negated": lambda p: p.data.mul_(-1),
    "data scaled": lambda p: p.data.mul_(1.5),
    "data noise": lambda p: p.data.add_(torch.randn_like(p) * 0.1),
    "in place": lambda p: p.detach().mul_(-1),  # moves the version counter
    "swapped": lambda p: setattr(p, "data", p.detach() * -1),  # a new storage
}
BUDGET_EDITS = ["in place", "swapped"]


def _schedule(plan: Any, step: int) -> list[int]:
    due = [i for i in plan.order if step % plan.period[i] == plan.phase[i]]
    return [i for i in due for _ in range(plan.repeat[i])]


def _choose(rng: random.Random, plan: Any) -> tuple[int, int] | None:
    """(step, victim): the victim steps at that step and another optimizer after it."""
    options = []
    for step in range(2, STEPS - 2):
        order = _schedule(plan, step)
        for v in set(order):
            last = max(k for k, i in enumerate(order) if i == v)
            if any(i != v for i in order[last + 1 :]):
                options.append((step, v))
    return rng.choice(options) if options else None


def test_an_edit_put_back_before_its_owner_steps_again_is_named() -> None:
    rng = seeded()
    for _ in range(50):
        plan = draw(rng)
        chosen = _choose(rng, plan)
        if chosen is not None:
            break
    assert chosen is not None
    at, victim = chosen
    edit = rng.choice(BUDGET_EDITS if plan.budget is not None else list(EDITS))
    print(plan, at, victim, edit)
    torch.manual_seed(rng.randrange(2**31))
    model = Net()
    opts = build(plan, model)
    guard = tgw.watch(model, opts, budget=plan.budget, min_stall_seconds=30.0, hang_seconds=None)
    labels = [f"optimizer {i} ({type(o).__name__})" for i, o in enumerate(opts)]
    owned = [p for g in opts[victim].param_groups for p in g["params"]]
    x = torch.randn(64, 8)
    saved: list[tuple[Any, Any]] = []
    for step in range(STEPS):
        order = _schedule(plan, step)
        for k, i in enumerate(order):
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            opts[i].zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opts[i].step()
            if step == at and i == victim and victim not in order[k + 1 :]:
                # The bits as the step left them (a swap keeps the storage itself).
                saved = [(p, p.data if edit == "swapped" else p.detach().clone()) for p in owned]
                for p in owned:
                    EDITS[edit](p)
        guard.step(loss=loss)
        for p, d in saved:  # put back: the owner's next boundary sees its own weights
            if edit == "swapped":
                p.data = d
            else:
                p.data.copy_(d)
        saved = []
    guard.close()
    found = high(guard)
    shown = [(a.rule, a.step, a.message) for a in guard.alerts]
    assert [a for a in found if a.step < at] == [], shown
    named = [a for a in found if a.step == at and a.evidence.get("optimizer") == labels[victim]]
    assert named and {a.rule for a in named} == {"TG1301"}, shown
