"""Tensors of a class that runs its own code on every op (TG1321, monitor/tensortypes.py).

Red team s5 (/work/tmp/s5/red_report.md, family 2): a ``torch.Tensor`` subclass whose
``__torch_function__`` made the first layer compute with noisy weights and scaled its
gradient, planted in the batch by a "data library" (B), by ``__class__`` assignment on
the loop's own dataset tensor (B2), on a parameter before ``watch()`` (C) and mid-run
from a thread (C3: caught only in exact mode, at full-fingerprint steps).  Generated:
where the class goes (parameter, gradient, optimizer state, batch), when (before
``watch()`` or at a step), exact or budget mode, declared or not: an undeclared class
is TG1321 high at that step in both modes; a declared one is quiet until its code is
patched or what its code reads changes (a class attribute, a global, its defaults: red
team s5 A10 set ``QParam.BITS = 2``); torch's own classes are quiet.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

F = torch.nn.functional
STEPS = 6


_FULL = 32  # a module global the classes' code reads (red team s5 A10: data, not code)


class Carrier(torch.Tensor):
    """Passes every op through: what it runs (and reads: ``BITS``, ``_FULL``) is the
    point, not what it changes.  Below full precision (a fake-quant stand-in) results
    leave the class."""

    BITS = 32

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if cls.BITS >= _FULL:
            return super().__torch_function__(func, types, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class CarrierParam(torch.nn.Parameter):
    BITS = 32

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if cls.BITS > _FULL:
            raise ValueError(f"{cls.BITS} bits: more than the format holds")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _patched(cls: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **(kwargs or {}))


def _patch(cls: Any, how: str) -> None:
    """What a declared class runs or reads, changed mid-run: its code, a data attribute,
    a global its code reads, or its function's defaults."""
    if how == "code":
        cls.__torch_function__ = classmethod(_patched)
    elif how == "data":
        cls.BITS = 2
    elif how == "global":
        globals()["_FULL"] = 64
    else:
        cls.__dict__["__torch_function__"].__func__.__defaults__ = ((), {})


def _run(
    rng: random.Random,
    where: str,
    at: int,
    declared: bool,
    patch_at: int,
    budget: float | None,
    how: str = "code",
) -> Any:
    torch.manual_seed(rng.randrange(1000))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    weight = model[rng.choice([0, 2])].weight
    cls = CarrierParam if where == "param" else Carrier

    def plant() -> None:
        if where == "param":
            weight.__class__ = cls
        elif where == "state":
            next(iter(opt.state[weight].values())).__class__ = cls
        elif where == "grad":
            weight.grad.__class__ = cls

    if at == 0 and where == "param":
        plant()
    declare = [cls] if declared else []
    guard = trainguard.watch(
        model, opt, ledger=None, hang_seconds=None, budget=budget, tensor_types=declare
    )
    for i in range(STEPS):
        batch = x.as_subclass(Carrier) if where == "batch" and i >= at else x
        loss = F.cross_entropy(model(batch.as_subclass(torch.Tensor)), y)
        opt.zero_grad()
        loss.backward()
        if where == "grad" and i == at:
            plant()
        opt.step()
        guard.step(loss=loss, batch=batch)
        if where in ("param", "state") and i + 1 == at:
            plant()  # between two steps: named at the next step's hooks
        if i + 1 == patch_at:
            _patch(cls, how)
    guard.close()
    return guard


@pytest.mark.parametrize("budget", [None, 0.02])
def test_a_tensor_class_that_is_not_torchs_is_high_at_the_step_it_appears(
    budget: float | None,
) -> None:
    rng = seeded()
    for _ in range(2):
        where = rng.choice(["param", "state", "grad", "batch"])
        at = rng.randrange(1 if where in ("state", "grad") else 0, STEPS - 1)
        declared = rng.random() < 0.5
        patch_at = rng.randrange(at + 1, STEPS) if declared and rng.random() < 0.5 else -1
        how = rng.choice(["code", "data", "global", "default"])
        saved = {c: c.__dict__["__torch_function__"] for c in (Carrier, CarrierParam)}
        defaults = {c: f.__func__.__defaults__ for c, f in saved.items()}
        try:
            guard = _run(rng, where, at, declared, patch_at, budget, how)
        finally:
            globals()["_FULL"] = 32
            for c, f in saved.items():
                c.__torch_function__ = f  # type: ignore[method-assign]
                c.BITS = 32
                f.__func__.__defaults__ = defaults[c]
        found = sorted({(a.step, a.severity) for a in guard.alerts if a.rule == "TG1321"})
        case = (where, at, declared, patch_at, how, budget, found)
        if not declared:
            assert found and found[0] == (at, Severity.HIGH), case
        elif patch_at < 0 or where == "grad":  # (the gradient is a new one each step)
            assert not found, case
        else:  # the declared class's code or data patched after the step patch_at - 1
            assert found and found[0][0] == max(patch_at, at) and found[0][1] >= Severity.HIGH, case


@pytest.mark.parametrize("budget", [None, 0.02])
def test_torch_own_classes_are_quiet(budget: float | None) -> None:
    """A lazy module's parameters (UninitializedParameter, materialized at the first
    forward) and plain Parameters: no TG1321."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    model(x)  # materialized, as torch's docs advise before the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=budget)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, batch=(x, y))
    guard.close()
    assert not [a for a in guard.alerts if a.rule == "TG1321"], guard.alerts


def test_judge_by_code_not_by_name() -> None:
    """A class claiming a torch module is judged by the code it runs; a lazy parameter's
    materialization is torch's own; a declared class patched is foreign."""
    from trainguard.monitor.tensortypes import TypeJudge

    class Forged(torch.nn.Parameter):
        __module__ = "torch.nn.parameter"

        def __repr__(self) -> str:
            return "Parameter"

    judge = TypeJudge([Carrier])
    assert judge.why(Forged) is not None
    assert judge.why(torch.nn.parameter.UninitializedParameter) is None
    assert judge.why(Carrier) is None and judge.why(CarrierParam) is not None
    assert judge.materialized(torch.nn.parameter.UninitializedParameter, torch.nn.Parameter)
    assert not judge.materialized(torch.nn.Parameter, CarrierParam)
    saved = Carrier.__dict__["__torch_function__"]
    try:
        Carrier.__torch_function__ = classmethod(_patched)  # type: ignore[method-assign,assignment]
        assert judge.repatched() and judge.why(Carrier) is not None
    finally:
        Carrier.__torch_function__ = saved  # type: ignore[method-assign]
