"""Honest changes the loop declares, and the same changes undeclared.

Red team 2026-12-04 (/work/tmp/redteam_watch/REPORT.md, "False alarms";
false_alarms.py frozen_then_unfrozen, false_alarms2.py wd_schedule,
false_alarms3.py sam / sam_exact / lookahead): a weight-decay schedule, gradual
unfreezing, SAM and Lookahead raised high or critical alerts with no way to
declare them, and budget mode alerted on SAM's ``p.data = saved`` (bits equal)
where exact mode did not.  Declared, each is recorded (TG1316) and silent at
high; undeclared (or declared wrongly), each still alerts.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

F = torch.nn.functional
STEPS = 30  # past budget mode's warm-up (16 boundaries with full fingerprints)


def _rnd() -> random.Random:
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    return random.Random(seed)


def _model() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _loss(model: Any, g: Any) -> Any:
    x = torch.randn(16, 8, generator=g)
    return F.cross_entropy(model(x), (x[:, :4]).argmax(1))


def _high(guard: Any) -> list[tuple[str, int, str]]:
    return [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


def _watch(model: Any, opt: Any, budget: float | None) -> Any:
    return trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=budget)


def test_declared_hyperparameter_schedules_are_recorded_and_undeclared_ones_alert() -> None:
    """Generative: a random setting on a random schedule in one or two groups, declared
    as one value or one per group; at a random step it is set without (or against) the
    declaration."""
    rnd = _rnd()
    for _ in range(3):
        torch.manual_seed(rnd.randrange(999))
        model = _model()
        two = rnd.random() < 0.5
        params: Any = (
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
            if two
            else model.parameters()
        )
        kind = rnd.choice(["adamw", "sgd"])
        if kind == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-2)
            key, start, end = rnd.choice([("weight_decay", 0.04, 0.4), ("eps", 1e-8, 1e-6)])
        else:
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
            key, start, end = rnd.choice([("momentum", 0.85, 0.95), ("weight_decay", 1e-4, 1e-3)])
        budget, bad, wrong = rnd.choice([None, 0.05]), rnd.randrange(3, 12), rnd.random() < 0.5
        print(kind, key, two, budget, bad, wrong)
        guard = _watch(model, opt, budget)
        g = torch.Generator().manual_seed(0)
        for step in range(12):
            value = start + (end - start) * step / 12
            for group in opt.param_groups:
                group[key] = value
            loss = _loss(model, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            said: Any = [value] * len(opt.param_groups) if rnd.random() < 0.5 else value
            if step == bad:
                said = {key: value * 3} if wrong else {}
            else:
                said = {key: said}
            guard.step(loss=loss, hyper=said)
        guard.close()
        high = _high(guard)
        assert [(r, s) for r, s, _ in high] == [("TG1303", bad)] * len(opt.param_groups), high
        assert any(a.rule == "TG1316" and a.severity == Severity.INFO for a in guard.alerts)


@pytest.mark.parametrize("budget", [None, 0.05])
def test_gradual_unfreezing_is_recorded_and_other_group_edits_alert(budget: float | None) -> None:
    """Generative: layers unfrozen at random steps through add_param_group (or, held by the
    optimizer from the start, by requires_grad alone, declared); a group appended by hand, or a
    layer frozen, is still TG1301/TG1303."""
    rnd = _rnd()
    torch.manual_seed(rnd.randrange(999))
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    held_from_start = rnd.random() < 0.5
    trained = model.parameters() if held_from_start else model[2].parameters()
    opt = torch.optim.Adam(trained, lr=1e-2)
    at, tamper = rnd.randrange(2, 10), rnd.choice(["append", "freeze"])
    bad = rnd.randrange(at + 2, 16)
    print(held_from_start, at, tamper, bad)
    guard = _watch(model, opt, budget)
    g = torch.Generator().manual_seed(0)
    for step in range(18):
        said = None
        if step == at:
            for p in model[0].parameters():
                p.requires_grad_(True)
            if not held_from_start:
                opt.add_param_group({"params": list(model[0].parameters()), "lr": 1e-3})
            else:  # held already: it trains at once, declared like a freeze (red team s5 A5)
                said = ["requires_grad"]
        if step == bad:
            if tamper == "append":
                # A group of a tensor that is not the model's (the defaults filled in,
                # as add_param_group would): training now updates an orphan.
                spare = torch.nn.Parameter(torch.zeros(3))
                opt.param_groups.append(dict(opt.defaults, params=[spare], lr=1.0))
            else:
                model[2].bias.requires_grad_(False)
        loss = _loss(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, changed=said)
    guard.close()
    high = _high(guard)
    assert high and {s for _, s, _ in high} == {bad}, high
    recorded = [a for a in guard.alerts if a.rule == "TG1316"]
    assert recorded and recorded[0].step == at and "0.weight" in recorded[0].evidence["tensors"]


@pytest.mark.parametrize("budget", [None, 0.05])
def test_weights_written_in_outside_step_are_recorded_and_edits_around_it_alert(
    budget: float | None,
) -> None:
    """Generative: SAM (perturb, second backward, restore with a float error) or
    Lookahead (slow weights every k steps) inside guard.outside_step(); at a random
    step an edit lands just before the block (laundering) or with no block at all."""
    rnd = _rnd()
    torch.manual_seed(rnd.randrange(999))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idiom, k = rnd.choice(["sam", "lookahead"]), rnd.randrange(2, 6)
    bad, where = rnd.randrange(3, STEPS - 2), rnd.choice(["before_block", "no_block"])
    print(idiom, k, bad, where)
    slow = [p.detach().clone() for p in model.parameters()]
    guard = _watch(model, opt, budget)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        loss = _loss(model, g)
        opt.zero_grad()
        loss.backward()
        if step == bad:
            with torch.no_grad():
                model[2].weight.mul_(0.5)  # the sabotage
        if idiom == "sam":
            undeclared = step == bad and where == "no_block"
            with contextlib.nullcontext() if undeclared else guard.outside_step("sam"):
                with torch.no_grad():
                    es = [p.grad * 0.05 for p in model.parameters()]
                    for p, e in zip(model.parameters(), es, strict=True):
                        p.add_(e)
                opt.zero_grad()
                _loss(model, torch.Generator().manual_seed(step)).backward()
                with torch.no_grad():
                    for p, e in zip(model.parameters(), es, strict=True):
                        p.sub_(e)
            opt.step()
        else:
            opt.step()
            if step % k == k - 1 or step == bad:
                with guard.outside_step("lookahead"), torch.no_grad():
                    for s, p in zip(slow, model.parameters(), strict=True):
                        s.add_(p - s, alpha=0.5)
                        p.copy_(s)
        guard.step(loss=loss)
    guard.close()
    high = _high(guard)
    assert high and all(r == "TG1301" for r, _, _ in high), high
    # SAM's edit lands before the step: caught at it; Lookahead's after it, entering the block.
    assert min(s for _, s, _ in high) == bad, high
    assert any(a.rule == "TG1316" for a in guard.alerts)


def test_budget_mode_verifies_bits_before_alerting_on_a_moved_version() -> None:
    """SAM restoring ``p.data = saved`` (bits equal, version and storage moved) is silent
    in budget mode as in exact mode; a restore that is not exact, at a random step past
    the warm-up, is still TG1301."""
    rnd = _rnd()
    bad = rnd.randrange(18, STEPS)
    torch.manual_seed(rnd.randrange(999))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = _watch(model, opt, 0.02)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        loss = _loss(model, g)
        opt.zero_grad()
        loss.backward()
        saved = {}
        with torch.no_grad():
            for p in model.parameters():
                saved[p] = p.data.clone()
                p.add_(p.grad * 0.05)
        opt.zero_grad()
        _loss(model, torch.Generator().manual_seed(step)).backward()
        for p in model.parameters():
            p.data = saved[p] if step != bad else saved[p] * 1.01
        opt.step()
        guard.step(loss=loss)
    guard.close()
    high = _high(guard)
    assert high and {(r, s) for r, s, _ in high} == {("TG1301", bad)}, high
