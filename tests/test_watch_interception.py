"""Red team of trainguard.watch, 2026-12-04 (/work/tmp/redteam_watch), classes B and C.

B, interception below Python names (#3-#6): a TorchDispatchMode or TorchFunctionMode
left active, saved-tensor default hooks left open, a Python kernel registered on an
aten op, a pre-hook on a parameter's AccumulateGrad node.  C, identity by container
and forged provenance (#7, #8): a closure cell of a torch function given new contents
(same function, code and closure tuple), and a wrapper compiled with a torch file's
name as its ``co_filename``.

Each test draws members of the family at random (seed printed; TRAINGUARD_TEST_SEED
reruns one): which op, which parameter, which function, which file name, and the step
the change is made at; each must be TG1304 critical at the step it is made (the
sabotage runs after ``guard.step`` of step ``at``: its step is ``at + 1``).  Honest
runs with activation checkpointing, saved tensors on CPU and autocast inside forward
stay below high.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

OPS = ["addmm", "mm", "threshold_backward", "mse_loss", "t"]  # what the scenario's step runs
STEPS = 9


def _scale(out: Any, factor: float) -> Any:
    return out * factor if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def _dispatch_mode(rng: random.Random, undo: list[Callable[[], None]]) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    op, factor = rng.choice(OPS), rng.choice([-1.0, 0.5, 1.0])

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            return _scale(out, factor) if func.__name__.split(".")[0] == op else out

    mode = Mode()
    mode.__enter__()
    undo.append(lambda: mode.__exit__(None, None, None))


def _function_mode(rng: random.Random, undo: list[Callable[[], None]]) -> None:
    from torch.overrides import TorchFunctionMode

    factor = rng.choice([-1.0, 0.5, 1.0])

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            return _scale(out, factor) if getattr(func, "__name__", "") == "linear" else out

    mode = Mode()
    mode.__enter__()
    undo.append(lambda: mode.__exit__(None, None, None))


def _saved_hooks(rng: random.Random, undo: list[Callable[[], None]]) -> None:
    factor = rng.choice([3.0, 1.0])
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: _scale(t, factor))
    hooks.__enter__()
    undo.append(lambda: hooks.__exit__(None, None, None))


def _library_kernel(rng: random.Random, undo: list[Callable[[], None]]) -> None:
    op = rng.choice(["threshold_backward", "relu"])

    def kernel(*args: Any) -> Any:
        if op == "relu":
            return torch.where(args[0] > 0, args[0], torch.zeros_like(args[0]))
        grad, x, threshold = args
        return -torch.where(x > threshold, grad, torch.zeros_like(grad))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = torch.library.Library("aten", "IMPL")
        lib.impl(op, kernel, "CPU")
    undo.append(lib._destroy)


def _node_hook(rng: random.Random, model: Any, undo: list[Callable[[], None]]) -> None:
    params = [p for p in model.parameters()]
    p = rng.choice(params)
    node = p.view_as(p).grad_fn.next_functions[0][0]
    factor = rng.choice([-1.0, 0.0, 2.0])
    handle = node.register_prehook(lambda grads: tuple(g * factor for g in grads))
    keep = [node]  # held like an attacker would: the node outlives the graph
    undo.append(lambda: (handle.remove(), keep.clear()))


def _plant(kind: str, rng: random.Random, model: Any, undo: list[Callable[[], None]]) -> None:
    """Put one member of family B in place (``undo`` takes it out again)."""
    if kind == "node":
        _node_hook(rng, model, undo)
        return
    plant = {
        "dispatch": _dispatch_mode,
        "function": _function_mode,
        "saved": _saved_hooks,
        "library": _library_kernel,
    }[kind]
    plant(rng, undo)


FAMILY_B = ["dispatch", "function", "saved", "library", "node"]


def _critical_at(guard: Any, step: int) -> list[Any]:
    return [
        a
        for a in guard.alerts
        if a.rule == "TG1304" and a.severity == Severity.CRITICAL and a.step == step
    ]


def test_interception_below_python_names_is_critical_at_its_step() -> None:
    rng = seeded()
    for kind in rng.sample(FAMILY_B, len(FAMILY_B)):
        at = rng.randrange(0, 5)
        undo: list[Callable[[], None]] = []

        def sabotage(
            step: int, model: Any, opt: Any, kind: str = kind, at: int = at, undo: Any = undo
        ) -> None:
            if step == at:
                _plant(kind, rng, model, undo)

        try:
            guard = sc.run(STEPS, optimizer=rng.choice(["adam", "sgd"]), sabotage=sabotage)
        finally:
            for u in reversed(undo):
                u()
        print(kind, at, [(a.rule, a.step, a.severity.name, a.message[:90]) for a in guard.alerts])
        assert _critical_at(guard, at + 1), (kind, at, guard.alerts)


def test_on_a_budget_interception_left_in_place_is_critical_at_the_next_drawn_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Budget mode: the interception state and the AccumulateGrad node check are one
    scheduled unit (its node hooks gather only in the backward of a drawn step).  Each
    family member, planted after the warm-up and left in place, is critical at the first
    step the schedule drew for ``interception`` after it, and the unit skips steps."""
    import trainguard.monitor.budget as budget

    rng = seeded()
    monkeypatch.setattr(budget, "chances", lambda allowance, costs: (dict.fromkeys(costs, 0.4), 0))
    steps = budget.WARMUP_STEPS + 14
    for kind in rng.sample(FAMILY_B, 3):
        at = rng.randrange(budget.WARMUP_STEPS, steps - 8)
        undo: list[Callable[[], None]] = []

        def sabotage(
            step: int, model: Any, opt: Any, kind: str = kind, at: int = at, undo: Any = undo
        ) -> None:
            if step == at:
                _plant(kind, rng, model, undo)

        try:
            guard = sc.run(
                steps, optimizer=rng.choice(["adam", "sgd"]), budget=0.02, sabotage=sabotage
            )
        finally:
            for u in reversed(undo):
                u()
        assert guard.schedule is not None
        drawn = [s for s in guard.schedule.recent["interception"] if at < s < steps]
        print(kind, at, drawn, [(a.rule, a.step, a.severity.name) for a in guard.alerts])
        ran = [s for s in guard.schedule.recent["interception"] if s >= budget.WARMUP_STEPS]
        assert len(ran) < steps - budget.WARMUP_STEPS, ran  # it did skip steps
        if drawn:
            assert _critical_at(guard, drawn[0]), (kind, at, drawn, guard.alerts)


# -- C: closure cells and forged provenance ----------------------------------------
def _cell_targets(opt_name: str) -> list[Callable[..., Any]]:
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    found = [torch.nn.utils.clip_grad_norm_, cls[opt_name].step]
    return [f for f in found if any(callable(c.cell_contents) for c in f.__closure__ or ())]


def test_a_closure_cell_given_new_contents_is_critical_at_its_step() -> None:
    rng = seeded()
    for _ in range(3):
        opt_name = rng.choice(["adam", "sgd", "adamw"])
        target = rng.choice(_cell_targets(opt_name))
        cell = next(c for c in target.__closure__ or () if callable(c.cell_contents))
        original = cell.cell_contents
        at = rng.randrange(0, 5)

        @functools.wraps(original)
        def evil(*a: Any, _f: Any = original, **k: Any) -> Any:
            return _f(*a, **k)  # even the same behaviour: the object is not the one

        def sabotage(
            step: int, model: Any, opt: Any, at: int = at, evil: Any = evil, cell: Any = cell
        ) -> None:
            if step == at:
                cell.cell_contents = evil

        try:
            guard = sc.run(STEPS, optimizer=opt_name, sabotage=sabotage)
        finally:
            cell.cell_contents = original
        print(target.__qualname__, opt_name, at, [(a.step, a.message[:90]) for a in guard.alerts])
        assert _critical_at(guard, at + 1), (target, at, guard.alerts)


_FORGED = """
def make(orig):
    def {name}(*args, **kwargs):
        return orig(*args, **kwargs)
    {name}.__wrapped__ = orig
    return {name}
"""


def test_a_wrapper_with_a_forged_torch_file_name_is_critical_at_its_step() -> None:
    rng = seeded()
    torch_dir = os.path.dirname(torch.__file__)
    files = ["nn/functional.py", "optim/adam.py", "__init__.py", "_dynamo/eval_frame.py"]
    targets = [(torch._C._nn, "mse_loss"), (torch, "relu"), (torch.nn.functional, "mse_loss")]
    for _ in range(3):
        ns, name = rng.choice(targets)
        fname = os.path.join(torch_dir, rng.choice(files))
        at = rng.randrange(0, 5)
        original = getattr(ns, name)
        scope: dict[str, Any] = {}
        exec(compile(_FORGED.format(name=name), fname, "exec"), scope)  # noqa: S102 - the attack

        forged = scope["make"](original)

        def sabotage(
            step: int, model: Any, opt: Any, at: int = at, ns: Any = ns, name: str = name
        ) -> None:
            if step == at:
                setattr(ns, name, forged)  # noqa: B023 - made for this member, used in it

        try:
            guard = sc.run(STEPS, optimizer="adam", sabotage=sabotage)
        finally:
            setattr(ns, name, original)
        print(name, fname, at, [(a.step, a.message[:90]) for a in guard.alerts])
        assert _critical_at(guard, at + 1), (name, fname, at, guard.alerts)


# -- honest idioms -----------------------------------------------------------------
class _Checkpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = sc.make_model()

    def forward(self, x: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.save_on_cpu():
                out = checkpoint(self.inner, x, use_reentrant=False)
        return out.float()


def test_checkpointing_autocast_and_saved_tensor_hooks_inside_forward_are_silent() -> None:
    from trainguard.monitor import guard as tgw

    model = _Checkpointed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = sc.make_data()
    guard = tgw.watch(model, opt, min_stall_seconds=0.25)
    for _ in range(6):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        guard.step(loss=loss, batch=(x[idx], y[idx]))
    guard.close()
    high = [a for a in guard.alerts if a.severity >= Severity.HIGH]
    assert not high, high


def test_a_forged_torch_file_name_installed_before_start_is_reported() -> None:
    """At start-up, code claiming torch's files must be code torch compiled (low: the
    baseline is what was installed at start, but it is named)."""
    from trainguard.monitor.alerts import Context
    from trainguard.monitor.checks.surface import SurfaceCheck

    rng = seeded()
    fname = os.path.join(
        os.path.dirname(torch.__file__), rng.choice(["nn/functional.py", "optim/sgd.py"])
    )
    scope: dict[str, Any] = {}
    exec(compile(_FORGED.format(name="mse_loss"), fname, "exec"), scope)  # noqa: S102 - the attack
    original = torch._C._nn.mse_loss
    torch._C._nn.mse_loss = scope["make"](original)
    try:
        alerts = SurfaceCheck(b"k" * 32).start(Context(0, 0))
    finally:
        torch._C._nn.mse_loss = original
    assert any("torch._C._nn.mse_loss" in a.message for a in alerts), alerts
    assert not SurfaceCheck(b"k" * 32).start(Context(0, 0))
