"""The criterion's settings and buffers, ``watch(..., loss_fn=criterion)`` (checks/lossfn.py).

Red team 4 A03b/c: ``loss_fn.label_smoothing = 0.6; loss_fn.ignore_index = 2`` and
``loss_fn.weight = [1, 1, 0.01, 1]`` mid-run changed what the loop minimises, and nothing
alerted (the criterion is no part of the model).

Generated: the criterion (CrossEntropyLoss with or without class weights and label
smoothing, NLLLoss, BCEWithLogitsLoss with or without pos_weight, HuberLoss, SmoothL1Loss),
exact or budget mode, and at a random step one of its settings changed or a buffer set or
edited in place: TG1318 (a setting) or TG1317 (a buffer) at high or above, at that step in
exact mode and at the first step the unit runs at or after it on a budget; the honest twin
is silent, and so is a loop that declares the change (``guard.step(changed=[name])``).
Seed printed; rerun one with TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.errors import UsageError  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

nn = torch.nn
STEPS, C = 16, 4


def criterion(rng: random.Random) -> tuple[str, Any, list[tuple[str, str, Any]]]:
    """A criterion, its task, and the changes an attacker can make:
    (name, "setting" | "buffer" | "inplace", value)."""
    kind = rng.choice(["ce", "nll", "bce", "huber", "smoothl1"])
    if kind in ("ce", "nll"):
        weighted = rng.random() < 0.5
        weight = torch.rand(C) + 0.5 if weighted else None
        changes = [
            ("ignore_index", "setting", rng.randrange(C)),
            ("weight", "inplace" if weighted else "buffer", torch.tensor([1, 1, 0.01, 1.0])),
        ]
        if kind == "ce":
            fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=rng.choice([0.0, 0.1]))
            return "class", fn, [*changes, ("label_smoothing", "setting", 0.6)]
        return "logprob", nn.NLLLoss(weight=weight), changes
    if kind == "bce":
        weighted = rng.random() < 0.5
        fn = nn.BCEWithLogitsLoss(pos_weight=torch.ones(C) if weighted else None)
        scale = torch.tensor([5.0, 1, 1, 1])
        return "multilabel", fn, [("pos_weight", "inplace" if weighted else "buffer", scale)]
    if kind == "huber":
        return "regress", nn.HuberLoss(delta=1.0), [("delta", "setting", 0.01)]
    return "regress", nn.SmoothL1Loss(beta=1.0), [("beta", "setting", 5.0)]


def run(rng: random.Random, attack: bool, declare: bool = False) -> tuple[Any, int, str]:
    """The guard, the attacked step and what changed (the same draws with or without)."""
    task, fn, changes = criterion(rng)
    name, how, value = rng.choice(changes)
    at = rng.randrange(2, STEPS - 1)
    budget = rng.choice([None, None, 0.05])
    torch.manual_seed(rng.randrange(2**31))
    out = 1 if task == "regress" else C
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, out))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = trainguard.watch(model, opt, hang_seconds=None, loss_fn=fn, budget=budget)
    x = torch.randn(32, 6)
    if task == "regress":
        y: Any = torch.randn(32, 1)
    elif task == "multilabel":
        y = (torch.rand(32, C) < 0.3).float()
    else:
        y = torch.randint(0, C, (32,))
    for step in range(STEPS):
        said = None
        if attack and step == at:
            if how == "inplace":
                with torch.no_grad():
                    getattr(fn, name).mul_(value)
            else:
                setattr(fn, name, value)
            said = [f"loss_fn.{name}"] if declare else None
        logits = model(x)
        loss = fn(logits.log_softmax(1) if task == "logprob" else logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, changed=said)
    guard.close()
    print(task, type(fn).__name__, name, how, "at", at, "budget", budget, attack, declare)
    unit = "buffers" if how != "setting" else "settings"
    recent = guard.schedule.recent[unit] if guard.schedule is not None else [at]
    drawn = [s for s in recent if s >= at]
    return guard, drawn[0] if drawn else -1, "TG1318" if how == "setting" else "TG1317"


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


def test_a_criterion_setting_or_buffer_changed_is_named_at_its_step() -> None:
    rng = seeded()
    for _ in range(6):
        state = rng.getstate()
        honest, _, _ = run(rng, attack=False)
        assert high(honest) == [], honest.alerts
        rng.setstate(state)
        guard, at, rule = run(rng, attack=True)
        found = [(a.rule, a.step, a.message[:100]) for a in high(guard)]
        if at < 0:
            continue  # budget mode: the unit drew no step after it in this short run
        assert found and found[0][:2] == (rule, at), (rule, at, found)
        assert "loss_fn." in found[0][2]
        rng.setstate(state)
        declared, _, _ = run(rng, attack=True, declare=True)
        assert high(declared) == [], declared.alerts


def test_a_loss_function_that_is_not_a_module_is_a_usage_error() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="loss_fn"):
        trainguard.watch(model, opt, loss_fn=nn.functional.mse_loss)
