"""Declared gradient transforms (monitor/gradtransform.py, issue #12: no false alarms on
honest work).

An honest-user hunt found loops the gradient factor (one positive factor of what backward
left) called TG1306 critical: torchtune's division by the tokens of each batch, timm's
adaptive gradient clipping, gradient centralization, new-token fine-tuning that zeroes the
old vocabulary's rows.  Each has a declared form the guard verifies: ``grad_scaling=
"varying"`` (any per-step factor, ONE for all gradients) and ``grad_transform=fn`` (the
guard re-applies fn to a copy of backward's gradient).  Each test draws an honest
composition at random (it stays quiet) and, for the same run, an edit on top of the
declared form (it is TG1306 at the step it starts): declaring does not open a hole.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.seeds import seeded
from trainguard.errors import UsageError
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw

torch.set_num_threads(1)

Transform = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
Edit = Callable[[torch.nn.Module, random.Random], str]


# -- honest transforms a loop applies per parameter (the loop and the guard call the same fn)
def _unitwise(x: torch.Tensor) -> torch.Tensor:
    if x.dim() <= 1:
        return x.norm()  # type: ignore[no-any-return]
    return x.norm(dim=tuple(range(1, x.dim())), keepdim=True)  # type: ignore[no-any-return]


def _agc(factor: float) -> Transform:
    """timm's adaptive_clip_grad, one parameter at a time."""

    def agc(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        limit = _unitwise(param).clamp(min=1e-3) * factor
        norm = _unitwise(grad)
        return torch.where(norm < limit, grad, grad * (limit / norm.clamp(min=1e-6)))

    return agc


def _centralize(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad - grad.mean(dim=1, keepdim=True) if grad.dim() > 1 else grad


def _rows(frozen: int) -> Transform:
    """New-token fine-tuning: the embedding's first ``frozen`` rows do not train."""

    def rows(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        if name == "embed.weight":
            grad[:frozen] = 0.0  # in place: the guard then reads the argument

    return rows


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _compose(parts: list[Transform]) -> Transform:
    def fn(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        for part in parts:
            out = part(name, param, grad)
            grad = grad if out is None else out
        return grad

    return fn


# -- edits on top of the declared form (each names the tensor it touched)
def _grads(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]


def _one_scaled(model: torch.nn.Module, rng: random.Random) -> str:
    name, grad = rng.choice([(n, g) for n, g in _grads(model) if g.dim() > 1])
    grad.mul_(rng.choice([0.1, 0.3, 3.0]))
    return name


def _flip_all(model: torch.nn.Module, rng: random.Random) -> str:
    for _, grad in _grads(model):
        grad.neg_()
    return ""


def _zero_one(model: torch.nn.Module, rng: random.Random) -> str:
    name, grad = rng.choice([(n, g) for n, g in _grads(model) if g.dim() > 1 and g.any()])
    grad.zero_()
    return name


def _noise(model: torch.nn.Module, rng: random.Random) -> str:
    name, grad = rng.choice([(n, g) for n, g in _grads(model) if g.dim() > 1 and g.any()])
    noise = torch.randn_like(grad)
    grad.copy_(noise * (grad.norm() / noise.norm()))
    return name


def _partial_flip(model: torch.nn.Module, rng: random.Random) -> str:
    name, grad = rng.choice([(n, g) for n, g in _grads(model) if g.dim() > 1 and g.any()])
    mask = torch.rand_like(grad) < rng.uniform(0.2, 0.5)
    grad[mask] = -grad[mask]
    return name


EDITS: dict[str, Edit] = {
    "one-scaled": _one_scaled,
    "flip-all": _flip_all,
    "zero-one": _zero_one,
    "noise": _noise,
    "partial-flip": _partial_flip,
}


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(24, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(x))))  # type: ignore[no-any-return]


def _run(
    setup: dict[str, Any], steps: int, edit: Edit | None, at: int, seed: int
) -> tuple[Any, list[str]]:
    torch.manual_seed(seed)
    model = _Net()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if setup["optimizer"] == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=3e-3)
    )
    fn: Transform | None = _compose(setup["transform"]) if setup["transform"] else None
    guard = tgw.watch(
        model,
        opt,
        hang_seconds=None,
        min_stall_seconds=10.0,
        budget=setup["budget"],
        grad_scaling="varying" if setup["varying"] else "fixed",
        grad_transform=fn,
    )
    rng, data = random.Random(seed), torch.Generator().manual_seed(seed)
    touched = []
    for step in range(steps):
        tokens = rng.randrange(4, 40)  # this step's batch: a count the loop divides by
        x = torch.randint(0, 24, (tokens,), generator=data)
        loss = torch.nn.functional.cross_entropy(model(x), x, reduction="sum")
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        if fn is not None:
            for name, p in model.named_parameters():
                p.grad = fn(name, p, _grad(p))
        for p in model.parameters():
            assert p.grad is not None
            p.grad.div_(tokens if setup["varying"] else setup["divide"])
        if setup["clip"] is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), setup["clip"])
        if edit is not None and step == at:
            touched.append(edit(model, rng))
        opt.step()
        guard.step(loss=loss)
    guard.close()
    return guard, touched


def _setup(rng: random.Random) -> dict[str, Any]:
    parts: list[Transform] = []
    if rng.random() < 0.5:
        parts.append(_rows(rng.randrange(4, 20)))
    if rng.random() < 0.5:
        parts.append(_centralize)
    if rng.random() < 0.5:
        parts.append(_agc(rng.choice([0.01, 0.05, 0.2])))
    rng.shuffle(parts)
    varying = not parts or rng.random() < 0.5
    return {
        "optimizer": rng.choice(["sgd", "adamw"]),
        "transform": parts,
        "varying": varying,
        "divide": rng.choice([1.0, 1.0, 8.0]),
        # clip_grad_value_ after a varying factor: its clamp value stays one value
        "clip": rng.choice([None, None, 0.05]) if not varying else None,
        "budget": None,
    }


def _high(guard: Any) -> list[tuple[str, int, str]]:
    return [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(3))
def test_declared_transforms_are_quiet_and_an_edit_on_top_is_still_tg1306(case: int) -> None:
    rng = seeded()
    setup = _setup(rng)
    name = rng.choice(sorted(EDITS))
    at = rng.randrange(2, 6)
    seed = rng.randrange(2**31)
    print(setup, name, at, seed)
    honest = _high(_run(setup, at + 2, None, at, seed)[0])
    assert honest == [], honest
    found = _high(_run(setup, at + 2, EDITS[name], at, seed)[0])
    assert any(rule == "TG1306" and step == at for rule, step, _ in found), found
    assert all(step >= at for _, step, _ in found), found


def test_an_undeclared_transform_is_still_tg1306() -> None:
    """The default stays strict: the same honest transforms, undeclared, are TG1306."""
    rng = seeded()
    setup = _setup(rng)
    while not setup["transform"] and not setup["varying"]:
        setup = _setup(rng)
    seed = rng.randrange(2**31)
    print(setup, seed)
    fn = _compose(setup["transform"]) if setup["transform"] else None
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0)
    for step in range(4):
        tokens = 4 + 9 * step  # a factor that changes at every step
        x = torch.randint(0, 24, (tokens,))
        loss = torch.nn.functional.cross_entropy(model(x), x, reduction="sum")
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        for name, p in model.named_parameters():
            p.grad = fn(name, p, _grad(p)) if fn is not None else p.grad
            assert p.grad is not None
            p.grad.div_(tokens if setup["varying"] else 1.0)
        opt.step()
        guard.step(loss=loss)
    guard.close()
    assert any(rule == "TG1306" for rule, _, _ in _high(guard)), guard.alerts


def test_a_transform_whose_code_is_swapped_mid_run_is_tg1306() -> None:
    """The guard holds the declared function's code: the loop cannot keep the name and run
    other code (flipped rows) under it."""
    rng = seeded()
    at = rng.randrange(2, 5)
    torch.manual_seed(rng.randrange(2**31))
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def fn(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad - grad.mean(dim=1, keepdim=True) if grad.dim() > 1 else grad

    def evil(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return -grad

    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, grad_transform=fn)
    for step in range(at + 2):
        if step == at:
            fn.__code__ = evil.__code__
        x = torch.randint(0, 24, (16,))
        loss = torch.nn.functional.cross_entropy(model(x), x)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        for name, p in model.named_parameters():
            p.grad = fn(name, p, _grad(p))
        opt.step()
        guard.step(loss=loss)
    guard.close()
    found = [(rule, step) for rule, step, _ in _high(guard)]
    assert ("TG1306", at) in found and all(s >= at for _, s in found), guard.alerts


_CLIP = 0.05  # a module global a declared transform reads


class _Clipper:
    def __init__(self, clip: float) -> None:
        self.clip = clip

    def __call__(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(-self.clip, self.clip)


def _reading(form: str) -> tuple[Transform, Callable[[], None]]:
    """A clipping transform in one ``form``, and the in-place change of what it reads
    (red team s5 A2: the guard applies the changed fn to its copy too)."""
    if form == "defaults":

        def by_default(
            name: str, param: torch.Tensor, grad: torch.Tensor, clip: float = 0.05
        ) -> Any:
            return grad.clamp(-clip, clip)

        return by_default, lambda: setattr(by_default, "__defaults__", (1e-4,))
    if form == "kwdefaults":

        def by_kw(name: str, param: torch.Tensor, grad: torch.Tensor, *, clip: float = 0.05) -> Any:
            return grad.clamp(-clip, clip)

        def change() -> None:
            assert by_kw.__kwdefaults__ is not None
            by_kw.__kwdefaults__["clip"] = 1e-4

        return by_kw, change
    if form == "partial":

        def clamp(name: str, param: torch.Tensor, grad: torch.Tensor, clip: float) -> Any:
            return grad.clamp(-clip, clip)

        fn = functools.partial(clamp, clip=0.05)
        return fn, lambda: fn.keywords.__setitem__("clip", 1e-4)
    if form == "closure":
        box = [0.05]

        def boxed(name: str, param: torch.Tensor, grad: torch.Tensor) -> Any:
            return grad.clamp(-box[0], box[0])

        return boxed, lambda: box.__setitem__(0, 1e-4)
    if form == "object":
        obj = _Clipper(0.05)
        return obj, lambda: setattr(obj, "clip", 1e-4)

    def by_global(name: str, param: torch.Tensor, grad: torch.Tensor) -> Any:
        return grad.clamp(-_CLIP, _CLIP)

    return by_global, lambda: globals().__setitem__("_CLIP", 1e-4)


@pytest.mark.parametrize("case", range(3))
def test_a_transform_whose_data_changes_mid_run_is_tg1306(case: int) -> None:
    """Generative: a declared clipping transform reads its limit from a default, a
    keyword default, a partial's keywords, a closure, an object's attribute or a module
    global; changed in place mid-run (the loop and the guard then apply the same changed
    function, so the comparison agrees) it is TG1306 at that step; unchanged, quiet."""
    rng = seeded()
    rng.seed(rng.randrange(2**32) + case)  # each case its own draw (replayed by the seed)
    form = rng.choice(["defaults", "kwdefaults", "partial", "closure", "object", "global"])
    at = rng.randrange(2, 5)
    seed = rng.randrange(2**31)
    print(form, at, seed)

    def run(change: bool) -> list[tuple[str, int]]:
        torch.manual_seed(seed)
        model = _Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        fn, edit = _reading(form)
        guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=10.0, grad_transform=fn)
        try:
            for step in range(at + 2):
                if change and step == at:
                    edit()  # before the step's forward, as a planted Dataset does
                x = torch.randint(0, 24, (16,))
                loss = torch.nn.functional.cross_entropy(model(x), x)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                for name, p in model.named_parameters():
                    p.grad = fn(name, p, _grad(p))
                opt.step()
                guard.step(loss=loss)
        finally:
            globals()["_CLIP"] = 0.05
        guard.close()
        return [(rule, step) for rule, step, _ in _high(guard)]

    assert run(False) == []
    found = run(True)
    assert ("TG1306", at) in found and all(s >= at for _, s in found), found


def test_tg1306_names_the_tensor_that_moved_not_every_tensor() -> None:
    rng = seeded()
    seed = rng.randrange(2**31)
    at = rng.randrange(2, 5)
    name = rng.choice(["one-scaled", "zero-one", "noise"])
    print(name, at, seed)
    setup = {"optimizer": "sgd", "transform": [], "varying": False, "divide": 1.0}
    guard, touched = _run({**setup, "clip": None, "budget": None}, at + 1, EDITS[name], at, seed)
    messages = [m for rule, step, m in _high(guard) if rule == "TG1306" and step == at]
    assert messages, guard.alerts
    moved = touched[0]
    others = [n for n, _ in _Net().named_parameters() if n != moved]
    assert moved in messages[0] and not any(n in messages[0] for n in others), messages


def test_varying_scaling_with_per_tensor_clipping_is_refused() -> None:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(UsageError, match="varying"):
        tgw.watch(model, opt, grad_scaling="varying", grad_clipping="per_tensor")
    with pytest.raises(UsageError, match="grad_transform"):
        tgw.watch(model, opt, grad_transform="centralize")
