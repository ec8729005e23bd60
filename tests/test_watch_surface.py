"""Issue 12, red team family "routes by identity" (grad_hook_1, data_1, state_2,
update_partial_1, clock_1): any callable a training step reaches, patched after
watch() started, is TG1304 critical naming it.

Which callables a step reaches is not a list in this file: one honest step
runs under ``sys.setprofile`` and every function it calls (C builtins, Tensor
methods, Python functions) that the guard's surface holds is a candidate.
Each run picks a few at random (seed printed; TRAINGUARD_TEST_SEED reruns one),
wraps each with ``functools.wraps`` so that it scales floating-point results,
and checks that training changed and that the alert names the attribute.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import surface  # noqa: E402
from trainguard.monitor.alerts import Context  # noqa: E402
from trainguard.monitor.checks import surface as surface_check  # noqa: E402
from trainguard.monitor.checks.surface import SWEEP_EVERY, SurfaceCheck  # noqa: E402

IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
DIRECT = ("torch.Tensor.", "torch._C._nn.", "torch.nn.functional.", "torch.relu", "torch.dropout")


def reached() -> list[tuple[Any, str, str]]:
    """(namespace, name, label) of every surface entry one honest training step calls."""
    import trainguard.monitor.guard  # noqa: F401 - the guard's modules are on the surface

    spaces = surface.snapshot()
    by_id: dict[int, list[tuple[surface.Space, str]]] = {}
    for s in spaces:
        for k, v in zip(s.keys, s.values, strict=True):
            by_id.setdefault(id(v), []).append((s, k))
            if isinstance(v, types.FunctionType):
                by_id.setdefault(id(v.__code__), []).append((s, k))
    seen: dict[str, tuple[Any, str, str]] = {}

    def note(space: surface.Space, key: str) -> None:
        ns, label = space.ns, f"{space.label}.{key}"
        if ns is torch._C.TensorBase:  # immutable: a patch shadows it on the subclass
            ns, label = torch.Tensor, f"torch.Tensor.{key}"
        if isinstance(ns, type) and ns.__flags__ & IMMUTABLE_TYPE:
            return  # C types: nobody can replace what they hold
        seen.setdefault(label, (ns, key, label))

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            arg = frame.f_code
        elif event != "c_call":
            return
        for space, key in by_id.get(id(arg), []):
            note(space, key)
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), torch.Tensor):
            note(tensor_base, arg.__name__)

    tensor_base = next(s for s in spaces if s.label == "torch._C.TensorBase")
    model = sc.make_model()
    x, y = sc.make_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sys.setprofile(profile)
    try:
        loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    finally:
        sys.setprofile(None)
    return [seen[k] for k in sorted(seen)]


def misbehaving(owner: Any, name: str, fired: list[int]) -> Callable[[], None]:
    """Install a wraps-wrapper that scales floating-point tensor results by 1.5."""
    original = owner.__dict__[name] if name in vars(owner) else getattr(owner, name)
    inner = original.__func__ if isinstance(original, staticmethod) else original
    local = threading.local()

    @functools.wraps(inner)
    def wrapper(*a: Any, **k: Any) -> Any:
        result = inner(*a, **k)
        if getattr(local, "busy", False) or not isinstance(result, torch.Tensor):
            return result
        if name.endswith("_") or not result.is_floating_point():
            return result  # in-place and integer results stay: only identity shows
        local.busy = True  # the scaling below calls torch itself
        try:
            fired[0] += 1
            return result * 1.5
        finally:
            local.busy = False

    installed = staticmethod(wrapper) if isinstance(original, staticmethod) else wrapper
    had = name in vars(owner)
    setattr(owner, name, installed)
    return (lambda: setattr(owner, name, original)) if had else (lambda: delattr(owner, name))


def _patch_at(
    at: int,
    ns: Any,
    name: str,
    fired: list[int],
    undo: list[Callable[[], None]],
    step: int,
    model: Any,
    opt: Any,
) -> None:
    if step == at:
        undo.append(misbehaving(ns, name, fired))


def final_weights(guard: Any) -> list[Any]:
    return [p.detach().clone() for p in guard.model.parameters()]


def test_a_random_callable_a_step_reaches_patched_mid_run_is_critical_and_named(
    monkeypatch: Any,
) -> None:
    every = 4  # a short sweep keeps the runs short; the hot names are read at every hook
    monkeypatch.setattr(surface_check, "SWEEP_EVERY", every)
    rng = seeded()
    candidates = reached()
    assert len(candidates) > 20, candidates  # the profile did see the step
    # Half from the namespaces the red team used (their results feed the step, so the
    # scaling changes training), half from everything the step reaches.
    direct = [c for c in candidates if c[2].startswith(DIRECT)]
    steps = 10 + every + 2
    clean = final_weights(sc.run(steps, optimizer="adam"))
    for i in range(4):
        ns, name, label = rng.choice(direct if i % 2 else candidates)
        at = rng.randrange(3, 10)
        fired = [0]
        undo: list[Callable[[], None]] = []

        patch = functools.partial(_patch_at, at, ns, name, fired, undo)
        try:
            guard = sc.run(steps, optimizer="adam", sabotage=patch)
        except Exception as exc:  # the patch broke training outright: still a change
            print(label, at, "training raised", type(exc).__name__)
            continue
        finally:
            for u in undo:
                u()
        print(label, at, fired, [(a.rule, a.step, a.message[:100]) for a in guard.alerts])
        if fired[0]:
            changed = final_weights(guard)
            assert any(not torch.equal(a, b) for a, b in zip(clean, changed, strict=True)), label
        named = [
            a.step
            for a in guard.alerts
            if a.rule == "TG1304" and a.severity == Severity.CRITICAL and label in a.message
        ]
        # Sabotage runs after guard.step of step `at`: the next hooks are at at + 1.
        assert named and at + 1 <= named[0] <= at + 1 + every, (label, at, guard.alerts)


def test_the_guards_own_clock_and_checks_are_on_the_surface() -> None:
    import trainguard.monitor.clock as clock

    check = SurfaceCheck(b"k" * 32, every=1)  # every namespace at every step hook
    labels = {f"{s.label}.{k}" for s in check.spaces for k in s.keys}
    assert "trainguard.monitor.clock._PERF_COUNTER" in labels
    assert "trainguard.monitor.guard.Guard._before_step" in labels
    real = clock._PERF_COUNTER
    clock._PERF_COUNTER = lambda: real()  # type: ignore[assignment]
    try:
        # every=1: the sweep covers all namespaces in the two hooks of one step.
        alerts = check.before_step(Context(5, 0)) + check.after_step(Context(5, 0))
    finally:
        clock._PERF_COUNTER = real
    assert [(a.rule, a.severity) for a in alerts] == [("TG1304", Severity.CRITICAL)]
    assert "trainguard.monitor.clock._PERF_COUNTER" in alerts[0].message
    # Put back: a change again, named again.
    assert check.before_step(Context(6, 0)) + check.after_step(Context(6, 0))


def test_honest_runs_and_imports_that_patch_before_start_are_silent() -> None:
    rng = seeded()
    # Something patched torch before watch() started (the model's ReLU calls it): part of
    # the baseline, not a change.
    original = torch.relu
    torch.relu = functools.wraps(original)(lambda *a, **k: original(*a, **k))
    try:
        for name in rng.sample(sorted(sc.OPTIMIZERS), 3):
            guard = sc.run(2 * SWEEP_EVERY + 3, optimizer=name, budget=rng.choice([None, 0.02]))
            critical = [a for a in guard.alerts if a.severity >= Severity.HIGH]
            assert critical == [], (name, guard.alerts)
            start = [a for a in guard.alerts if a.rule == "TG1304"]
            # Code from this test file is not installed code: reported at start-up, low.
            assert [(a.step, a.severity) for a in start] == [(0, Severity.LOW)]
            assert "torch.relu" in start[0].message
    finally:
        torch.relu = original


class _Ctx:
    """A context manager from outside torch: torch's own decorator around it is no excuse."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_torch_compile_is_silent_and_torch_wrapping_foreign_code_is_not() -> None:
    from torch.utils._contextlib import context_decorator

    check = SurfaceCheck(b"k" * 32, every=1)
    model = torch.nn.Linear(2, 2)
    torch.compile(model, backend="eager")(torch.randn(1, 2)).sum().backward()
    torch.optim.Adam(model.parameters()).step()
    alerts = [a for i in range(4) for a in check.before_step(Context(i, 0))]
    assert alerts == [], [a.message for a in alerts]
    original = torch.relu
    torch.relu = context_decorator(lambda: _Ctx(), original)
    try:
        alerts = check.before_step(Context(9, 0)) + check.after_step(Context(9, 0))
    finally:
        torch.relu = original
    assert [a.severity for a in alerts] == [Severity.CRITICAL] and "torch.relu" in alerts[0].message
