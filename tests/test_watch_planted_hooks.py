"""Gradient hooks made of torch's own code, planted before watch() (red team 2026-12-05,
A04n ``p.register_hook(torch.neg)``, A04p ``functools.partial(torch.mul, other=0.1)``).

The start-up audit reported only hooks whose code file lies outside torch; a
builtin, a partial of one, a method descriptor, a torch module used as a callable
object or a Python function of torch all lie in torch, and flip, scale, clamp or
zero gradients (the incident's flipped gradient, planted by a checkpoint payload).
Each run draws (seed printed; TRAINGUARD_TEST_SEED reruns one) one to three such
hooks, which torch code, wrapped how (bare, in a partial, in a partial of a partial),
and where (a parameter's tensor hooks, its post-accumulate-grad hooks, a module's
full backward hooks, the optimizer's step hooks): each is TG1304 high at step 0, but a
parameter's tensor hook: the guard heads that chain with a witness of its own and
verifies what the chain does to the gradient (monitor/hookchain.py), so a read-only
logging hook is medium and one that changes the gradient is TG1306 at the first step.
Invariant: a gradient-changing hook present at start-up is high unless what it runs
is trainguard's or torch's distributed machinery; an honest start stays silent.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import hookcode  # noqa: E402


def _torch_code(rng: random.Random) -> Any:
    """One piece of torch's own code that changes what it is given."""
    c = rng.choice([0.0, 0.1, -1.0, 3.0])
    return rng.choice(
        [
            lambda: torch.neg,
            lambda: functools.partial(torch.mul, other=c),
            lambda: torch.Tensor.neg,
            lambda: torch._refs.neg,  # a Python function in torch
            lambda: torch.nn.Hardtanh(-abs(c) or -0.5, abs(c) or 0.5),  # a callable object (clamps)
            lambda: functools.partial(torch.nn.init.constant_, val=c),
        ]
    )()


def _wrapped(rng: random.Random, code: Any) -> Any:
    how = rng.choice(["bare", "partial", "partial-of-partial"])
    if how == "partial":
        return functools.partial(code)
    if how == "partial-of-partial":
        return functools.partial(functools.partial(code))
    return code


def _plant(rng: random.Random, model: Any, opt: Any, hook: Any, where: str) -> Callable[[], None]:
    params = list(model.parameters())
    if where == "tensor":
        return rng.choice(params).register_hook(hook).remove  # type: ignore[no-any-return]
    if where == "post-accumulate":
        return rng.choice(params).register_post_accumulate_grad_hook(hook).remove  # type: ignore[no-any-return]
    if where == "module-backward":
        return model[rng.choice([0, 3])].register_full_backward_hook(hook).remove  # type: ignore[no-any-return]
    return opt.register_step_pre_hook(hook).remove  # type: ignore[no-any-return]


def test_gradient_hooks_made_of_torch_code_planted_before_watch_are_high_at_start() -> None:
    rng = seeded()
    model = sc.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    undo = []
    planted = []
    sites = []
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(["tensor", "post-accumulate", "module-backward", "optimizer-pre"])
        code = _torch_code(rng)
        while where == "tensor" and isinstance(code, torch.nn.Hardtanh):
            code = _torch_code(rng)  # a clamp may leave small gradients as they are
        hook = _wrapped(rng, code)
        planted.append(hookcode.name(hook))
        sites.append(where)
        undo.append(_plant(rng, model, opt, hook, where))
    try:
        guard = sc.tgw.watch(model, opt, hang_seconds=None)
        if set(sites) == {"tensor"}:  # judged by what they do: one step
            model.train()
            x = torch.randn(16, 8)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            guard.step()
        guard.close()
    finally:
        for u in undo:
            u()
    print(planted, sites, [(a.rule, a.severity, a.message) for a in guard.alerts])
    start = [a for a in guard.alerts if a.evidence.get("at_start")]
    if set(sites) == {"tensor"}:
        changed = [a for a in guard.alerts if a.rule == "TG1306" and "gradient hook" in a.message]
        assert changed and changed[0].step == 0, planted
        assert all(a.severity == Severity.MEDIUM and "verified" in a.message for a in start)
    else:
        assert any(a.rule == "TG1304" and a.severity >= Severity.HIGH for a in start), planted
    assert all(a.step == 0 for a in start)
    # An honest start with the same model and optimizer, hooks removed: silent.
    guard = sc.tgw.watch(model, opt, hang_seconds=None)
    guard.close()
    assert guard.alerts == []


def test_torch_machinery_and_trainguard_hooks_are_trusted_and_look_alikes_are_not() -> None:
    from torch.utils import checkpoint

    from trainguard.monitor import forwards

    assert hookcode.trusted(checkpoint.checkpoint)  # torch's decorator, machinery inside
    assert hookcode.trusted(functools.partial(forwards.declared_names))
    # A function claiming a machinery module by its writable __module__ is not machinery.
    fake = eval("lambda g: -g")  # noqa: S307 - code with no file, as a payload's
    fake.__module__ = "torch.distributed.fsdp"
    assert not hookcode.trusted(fake)
    assert not hookcode.trusted(torch.neg)
    assert not hookcode.trusted(torch.no_grad()(fake))  # judged by what it wraps
