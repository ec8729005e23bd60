"""Honest tools and state changes that watch() used to flag (honest-user hunt, issue #12),
and the attacks the same checks exist for.

Each test draws (seed printed; TRAINGUARD_TEST_SEED reruns one) an honest composition,
which must stay below high in exact and budget mode, and an adversarial variant of the
path the fix relaxed, which must stay high or critical.
"""

from __future__ import annotations

import cProfile
import random
import sys
import trace
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402

torch.set_num_threads(1)
# (step, guard, model, optimizer) -> guard.step's further arguments (changed=) or None
Hook = Callable[[int, Any, Any, Any], "dict[str, Any] | None"]


def _run(mode: str, steps: int, at: Hook, *, bn: bool = False, drop: bool = False) -> tgw.Guard:
    torch.manual_seed(0)
    layers: list[Any] = [torch.nn.Linear(6, 8)]
    layers += [torch.nn.BatchNorm1d(8)] if bn else []
    layers += [torch.nn.Dropout(0.2)] if drop else []
    model = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    kw: dict[str, Any] = {"budget": 0.02} if mode == "budget" else {}
    guard = tgw.watch(model, opt, ledger=None, anchors=False, hang_seconds=None, **kw)
    try:
        for step in range(steps):
            x = torch.randn(16, 6)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=x, **(at(step, guard, model, opt) or {}))
    finally:
        guard.close()
    return guard


def _high(guard: tgw.Guard) -> list[Any]:
    print([(a.rule, a.step, a.severity.name, a.message[:160]) for a in guard.alerts])
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


# -- profilers and tracers: guard.profiling() -----------------------------------------------


@contextmanager
def _cprofile(timer: Any = None) -> Iterator[None]:
    prof = cProfile.Profile(timer) if timer else cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()


@contextmanager
def _torch_profiler() -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True):
        yield


@contextmanager
def _settrace(fn: Any) -> Iterator[None]:
    sys.settrace(fn)
    try:
        yield
    finally:
        sys.settrace(None)


def _stdlib_trace() -> AbstractContextManager[None]:
    return _settrace(trace.Trace(count=1, trace=0).globaltrace)


HONEST: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "cProfile": _cprofile,
    "torch.profiler": _torch_profiler,
    "trace": _stdlib_trace,
}


class _CallableProfile(cProfile.Profile):
    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        return None


class _Counting(trace.Trace):
    def localtrace_count(self, frame: Any, why: str, arg: Any) -> Any:
        return None


def _named_like_cprofile(frame: Any, event: str, arg: Any) -> None:
    return None


_named_like_cprofile.__module__ = "cProfile"


@contextmanager
def _setprofile(fn: Any) -> Iterator[None]:
    sys.setprofile(fn)
    try:
        yield
    finally:
        sys.setprofile(None)


ADVERSARIAL: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "cProfile with a timer": lambda: _cprofile(lambda: 0.0),
    "callable cProfile subclass": lambda: _setprofile(_CallableProfile()),
    "function named like cProfile's": lambda: _setprofile(_named_like_cprofile),
    "trace.Trace subclass": lambda: _settrace(_Counting(count=1, trace=0).globaltrace),
}


def test_a_verified_profiler_inside_guard_profiling_is_recorded_not_alerted() -> None:
    rng = seeded()

    def one(mode: str) -> None:
        tool = rng.choice(sorted(HONEST))
        first, length = rng.randrange(0, 6), rng.randrange(1, 3)
        # The profiler's own context inside the window, or around it (it then stops after
        # the window closes, before the next step).
        outside = rng.random() < 0.5
        print(mode, tool, first, length, "outside" if outside else "inside")
        stack = ExitStack()

        def at(step: int, guard: Any, model: Any, opt: Any) -> None:
            if step == first:
                if outside:
                    stack.enter_context(HONEST[tool]())
                    stack.enter_context(guard.profiling())
                else:
                    stack.enter_context(guard.profiling())
                    stack.enter_context(HONEST[tool]())
            if step == first + length:
                stack.close()

        guard = _run(mode, 8, at)
        stack.close()
        assert _high(guard) == [], (mode, tool)
        noted = [a for a in guard.alerts if a.rule == "TG1316" and "profiling" in a.message]
        assert noted and tool in noted[0].message

    for mode in ("exact", "budget"):
        one(mode)


def test_an_unverified_trace_or_profile_function_in_the_window_or_a_tool_outside_it_is_high() -> (
    None
):
    rng = seeded()
    mode = rng.choice(["exact", "budget"])
    case = rng.choice([*sorted(ADVERSARIAL), "undeclared", "outlives the window", "timer swapped"])
    first = rng.randrange(0, 5)
    print(mode, case, first)
    stack = ExitStack()
    prof = cProfile.Profile()

    def at(step: int, guard: Any, model: Any, opt: Any) -> None:
        if step == first:
            if case == "undeclared":
                stack.enter_context(HONEST[rng.choice(sorted(HONEST))]())
            elif case == "outlives the window":
                with guard.profiling():
                    stack.enter_context(_cprofile())
            elif case == "timer swapped":
                stack.enter_context(guard.profiling())
                prof.enable()
                stack.callback(prof.disable)
            else:
                stack.enter_context(guard.profiling())
                stack.enter_context(ADVERSARIAL[case]())
        if step == first + 1 and case == "timer swapped":
            prof.__init__(lambda: 0.0)  # type: ignore[misc]  # a timer on the running profiler
        if step == first + 3:
            stack.close()

    guard = _run(mode, 7, at)
    stack.close()
    high = [a for a in _high(guard) if a.rule == "TG1304"]
    assert high, case
    assert high[0].step == first + (2 if case == "timer swapped" else 1), case


# -- seeding whose effect is undone (torch.random.fork_rng) ---------------------------------


def _honest_isolated(rng: random.Random) -> Callable[[Any], None]:
    """A repeatable evaluation that seeds and puts every seeded generator back."""
    seed = rng.randrange(100)

    def fork(model: Any) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            model(torch.randn(4, 6))
            if rng.random() < 0.5:  # nested
                with torch.random.fork_rng(devices=[]):
                    torch.random.manual_seed(seed + 1)
                    torch.rand(3)

    def saved(model: Any) -> None:  # Lightning's isolate_rng: states saved and set back
        states = torch.get_rng_state(), random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)
        with torch.no_grad():
            model(torch.randn(4, 6))
        random.random()
        torch.set_rng_state(states[0])
        random.setstate(states[1])

    return rng.choice([fork, saved])


def _leaky(rng: random.Random, case: str) -> Callable[[Any], None]:
    seed = rng.randrange(100)
    earlier = torch.get_rng_state()

    def run(model: Any) -> None:
        if case == "outside fork_rng":
            torch.manual_seed(seed)
        elif case == "python seeded in fork_rng":  # fork_rng restores torch's only
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
        elif case == "set back to another state":  # an earlier state, not the one before
            torch.manual_seed(seed)
            torch.set_rng_state(earlier)
        elif case == "torch set back, python not":
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            random.seed(seed)
            torch.set_rng_state(state)
        model(torch.randn(4, 6))

    return run


def test_a_seed_whose_generators_are_put_back_is_quiet_one_that_leaks_is_high() -> None:
    rng = seeded()

    def one(mode: str) -> None:
        at = sorted(rng.sample(range(1, 9), 3))
        evals = {s: _honest_isolated(rng) for s in at}
        print(mode, at, [f.__name__ for f in evals.values()])

        def honest(step: int, guard: Any, model: Any, opt: Any) -> None:
            if step in evals:
                evals[step](model)

        assert _high(_run(mode, 10, honest, drop=True)) == [], mode

    for mode in ("exact", "budget"):
        one(mode)
    mode = rng.choice(["exact", "budget"])
    case = rng.choice(
        [
            "outside fork_rng",
            "python seeded in fork_rng",
            "set back to another state",
            "torch set back, python not",
        ]
    )
    when = rng.randrange(1, 6)
    leak = _leaky(rng, case)
    print(mode, case, when)

    def attack(step: int, guard: Any, model: Any, opt: Any) -> None:
        if step == when:
            leak(model)

    high = [a for a in _high(_run(mode, 8, attack, drop=True)) if a.rule == "TG1305"]
    assert high and high[0].step == when + 1, case


# -- BatchNorm statistics recomputed on the live model (update_bn, PreciseBN) ---------------

BN = ["1.running_mean", "1.running_var", "1.num_batches_tracked", "1.momentum"]


def _precise_bn(model: Any, batches: list[Any]) -> None:
    """fvcore/detectron2 PreciseBN: momentum 1.0 for a few no-grad forwards, the average
    of their statistics written back, momentum put back."""
    bn = model[1]
    momentum, means, variances = bn.momentum, [], []
    bn.momentum = 1.0
    for x in batches:
        with torch.no_grad():
            model(x)
        means.append(bn.running_mean.clone())
        variances.append(bn.running_var.clone())
    bn.running_mean.copy_(torch.stack(means).mean(0))
    bn.running_var.copy_(torch.stack(variances).mean(0))
    bn.momentum = momentum


def _recompute(rng: random.Random) -> Callable[[Any], None]:
    batches = [torch.randn(8, 6) for _ in range(rng.randrange(1, 4))]
    if rng.random() < 0.5:
        return lambda model: torch.optim.swa_utils.update_bn(batches, model)
    return lambda model: _precise_bn(model, batches)


def test_batchnorm_statistics_recomputed_and_declared_are_quiet_undeclared_or_more_is_high() -> (
    None
):
    rng = seeded()

    def one(mode: str) -> None:
        at = set(rng.sample(range(1, 9), 2))
        recompute = _recompute(rng)
        print(mode, sorted(at))

        def honest(step: int, guard: Any, model: Any, opt: Any) -> dict[str, Any] | None:
            if step not in at:
                return None
            recompute(model)
            return {"changed": BN}

        assert _high(_run(mode, 10, honest, bn=True)) == [], mode

    for mode in ("exact", "budget"):
        one(mode)
    mode = rng.choice(["exact", "budget"])
    case = rng.choice(["a weight edited too", "undeclared", "momentum left changed"])
    when = rng.randrange(1, 6)
    recompute = _recompute(rng)
    print(mode, case, when)

    def attack(step: int, guard: Any, model: Any, opt: Any) -> dict[str, Any] | None:
        if step != when:
            return None
        recompute(model)
        if case == "a weight edited too":
            with torch.no_grad():
                model[0].weight[0, 0] += 0.5
        if case == "momentum left changed":
            model[1].momentum = 0.5
            return {"changed": BN[:3]}
        return None if case == "undeclared" else {"changed": BN}

    rules = {
        "a weight edited too": "TG1301",
        "undeclared": "TG1317",
        "momentum left changed": "TG1318",
    }
    high = [a for a in _high(_run(mode, 8, attack, bn=True)) if a.rule == rules[case]]
    assert high and high[0].step in (when, when + 1), case


# -- weights loaded back bit for bit (EMA swapped in for evaluation) ------------------------


def _swap(rng: random.Random) -> Callable[[Any], None]:
    """An honest write-back: the weights put back exactly as the step left them."""
    ema = {k: v.clone() + 0.01 for k, v in torch.nn.Linear(6, 8).state_dict().items()}

    def ema_swap(model: Any) -> None:
        target = model[0] if rng.random() < 0.5 else model
        backup = {k: v.clone() for k, v in target.state_dict().items()}
        if target is model:
            target.load_state_dict({**backup, **{f"0.{k}": v for k, v in ema.items()}})
        else:
            target.load_state_dict(ema)
        with torch.no_grad():
            model(torch.randn(4, 6))
        target.load_state_dict(backup)

    def same_bits(model: Any) -> None:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})

    return rng.choice([ema_swap, same_bits])


def test_weights_loaded_back_bit_for_bit_are_quiet_in_budget_mode_changed_ones_critical() -> None:
    rng = seeded()

    def one(mode: str) -> None:
        at = sorted(rng.sample(range(17, 26), 2))
        swap = {s: _swap(rng) for s in at}
        print(mode, at, [f.__name__ for f in swap.values()])

        def honest(step: int, guard: Any, model: Any, opt: Any) -> None:
            if step in swap:
                swap[step](model)

        assert _high(_run(mode, 28, honest)) == [], mode

    for mode in ("exact", "budget"):
        one(mode)
    case = rng.choice(["changed bits loaded", "edited, then loaded as it is", "stale backup"])
    when = rng.randrange(18, 24)
    print("budget", case, when)
    stale: dict[str, Any] = {}

    def attack(step: int, guard: Any, model: Any, opt: Any) -> None:
        if step == when - 2:
            stale.update({k: v.clone() for k, v in model.state_dict().items()})
        if step != when:
            return
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if case == "changed bits loaded":
            state["0.weight"][rng.randrange(8), rng.randrange(6)] += 0.25
        elif case == "edited, then loaded as it is":
            with torch.no_grad():
                model[0].weight.mul_(0.5)
            state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            state = stale
        model.load_state_dict(state)

    critical = [
        a
        for a in _high(_run("budget", 26, attack))
        if a.rule == "TG1301" and a.severity == Severity.CRITICAL
    ]
    assert critical and critical[0].step == when + 1, case
