"""Blinding a check never makes its step trusted (red team 3, F3).

A check that raises leaves what it covers unchecked at that step.  Red team 3 put a
``torch.Tensor`` subclass into ``optimizer.state`` whose ``__torch_function__`` raised
on its first use: the tamper check's comparison failed (TG1315 medium), the weights
edited in that step were never reported, and the failed comparison's after-state became
the next baseline.  The invariants (monitor/unread.py, checks/tamper.py, safety.py): a
tensor that cannot be read is named unverified while every other one is compared; a
comparison that did not complete is no baseline (the next one re-compares from the last
verified state); a core check's failure is high at once.

Generated: a blinding method (a tensor subclass raising on its first uses, or whenever
the target check's module is on the stack; a state slot whose key or value raises on
access; a param group value that raises) x a target check x a step x how long it stays,
with a weight edit in the same step: the edited tensor is named (TG1301) at that step,
and nothing high comes before it.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.alerts import Context  # noqa: E402
from trainguard.monitor.checks.tamper import TamperCheck  # noqa: E402
from trainguard.monitor.fingerprint import Fingerprinter  # noqa: E402
from trainguard.monitor.stats import RobustWindow  # noqa: E402

nn = torch.nn
# The modules each target check reads the optimizer's state or settings through.
TARGETS = {
    "tamper": ("checks/tamper.py", "monitor/unread.py", "monitor/fingerprint.py"),
    "update": ("checks/update.py",),
    "state": ("checks/state.py",),
    "hyper": ("checks/hyper.py",),
    "any": ("trainguard/monitor/",),
}


class Trap:
    """When a read raises: on the first ``uses`` reads while armed, or on reads from the
    target modules' frames while armed."""

    def __init__(self, target: str, uses: int | None) -> None:
        self.where, self.uses, self.armed = TARGETS[target], uses, False

    def fires(self) -> bool:
        if not self.armed:
            return False
        if self.uses is not None:
            self.uses -= 1
            return self.uses >= 0
        frame: Any = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if any(w in name for w in self.where) and "tests/" not in name:
                return True
            frame = frame.f_back
        return False


def subclass(trap: Trap) -> Any:
    class Evil(torch.Tensor):  # type: ignore[misc,name-defined]  # torch is Any here
        @classmethod
        def __torch_function__(
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if trap.fires():
                raise RuntimeError("blinded")
            return super().__torch_function__(func, types, args, kwargs or {})

    return Evil


class Key(str):
    """A state slot's key whose text raises."""

    trap: Trap

    def __str__(self) -> str:
        if self.trap.fires():
            raise RuntimeError("blinded key")
        return str.__str__(self)

    __format__ = lambda self, spec: str(self)  # noqa: E731 - f-strings call __format__


class Value:
    """A state or param group value whose attribute access raises."""

    def __init__(self, trap: Trap) -> None:
        object.__setattr__(self, "_trap", trap)

    def __getattribute__(self, name: str) -> Any:
        if object.__getattribute__(self, "_trap").fires():
            raise RuntimeError(f"blinded attribute {name}")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return "Value()"


def plant(how: str, trap: Trap, opt: Any) -> Any:
    """Put the blinding object in place; returns a callable that takes it out."""
    p = opt.param_groups[0]["params"][0]
    state = opt.state[p]
    if how == "subclass slot":
        state["evil"] = torch.zeros(3).as_subclass(subclass(trap))
        return lambda: state.pop("evil")
    if how == "subclass moment":  # a real moment, as the subclass: the optimizer still runs
        slot = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim())
        real = state[slot]
        state[slot] = real.as_subclass(subclass(trap))
        return lambda: state.__setitem__(slot, state[slot].as_subclass(torch.Tensor))
    if how == "key":
        key = Key("evil")
        key.trap = trap
        state[key] = torch.zeros(2)
        return lambda: state.pop(key)
    if how == "value":
        state["evil"] = Value(trap)
        return lambda: state.pop("evil")
    group = opt.param_groups[0]  # "group value"
    group["evil"] = Value(trap)
    return lambda: group.pop("evil")


def run(rng: Any, *, blind: bool) -> tuple[Any, int, str]:
    torch.manual_seed(rng.randrange(2**31))
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    kind = rng.choice(["sgd", "adam", "adamw"])
    if kind == "sgd":
        opt: Any = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW"}[kind])(
            model.parameters(), lr=1e-2
        )
    target = rng.choice(sorted(TARGETS))
    how = rng.choice(["subclass slot", "subclass moment", "key", "value", "group value"])
    if target == "hyper":
        how = "group value"
    # Counted uses only for a slot the optimizer never reads (a real moment's first use
    # is the optimizer's own, which would end the step, not blind a check).
    trap = Trap(target, rng.choice([1, 2, 5, None]) if how == "subclass slot" else None)
    stays = rng.choice(["step", "run"])
    budget = rng.choice([None, 0.05])
    at = rng.randrange(3, 10)
    name, edited = rng.choice(list(model.named_parameters()))
    write = rng.choice(["in place", "data"] if budget is None else ["in place"])
    what = f"{kind} {how} -> {target} uses={trap.uses} stays={stays} budget={budget} at={at}"
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=budget)
    remove = None
    for step in range(at + 3):
        x, y = torch.randn(16, 6), torch.randn(16, 2)
        if step == at and blind:
            with torch.no_grad():
                (edited if write == "in place" else edited.data).add_(0.5)
            remove = plant(how, trap, opt)
            trap.armed = True
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
        if step == at and stays == "step" and remove is not None:
            trap.armed = False
            remove()
    guard.close()
    return guard, at, f"{what} edited={name}"


@pytest.mark.parametrize("draw", range(6))
def test_a_blinded_check_never_hides_the_weight_edit_of_its_step(draw: int) -> None:
    rng = seeded()
    guard, at, what = run(rng, blind=True)
    found = [(a.rule, a.step, str(a.severity)) for a in guard.alerts]
    print(what, found)
    high = [a for a in guard.alerts if a.severity >= Severity.HIGH]
    assert not [a for a in high if a.step < at], (what, found)
    # The edit is named at its own step: the blinded tensor is not, and never hides the rest.
    edited = what.rsplit("edited=", 1)[1]
    named = [a for a in guard.alerts if a.rule == "TG1301" and edited in a.evidence["tensors"]]
    assert [a.step for a in named][:1] == [at], (what, found)


def test_honest_runs_of_the_same_setup_raise_nothing_high() -> None:
    rng = seeded()
    for _ in range(2):
        guard, _, what = run(rng, blind=False)
        assert [a for a in guard.alerts if a.severity >= Severity.HIGH] == [], (what, guard.alerts)


def test_a_comparison_that_failed_is_no_baseline() -> None:
    """Fault injection at the tamper check itself (whatever made it fail): its failed
    boundary keeps the last verified state; the next comparison names, against it, a
    weight no optimizer step wrote (TG1301) and the rest as changed unverified (high);
    with nothing changed across the gap, nothing is reported."""
    rng = seeded()
    torch.manual_seed(rng.randrange(2**31))
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    frozen = model[1].bias  # no gradient reaches it: the optimizer never writes it
    frozen.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    named = list(model.named_parameters())
    check = TamperCheck(Fingerprinter(b"k" * 32), named, opt, times=RobustWindow())
    edit = rng.choice(["frozen", "trained", "none"])
    steps = rng.randint(1, 3)  # failed boundaries in a row
    real = check._take
    for step in range(steps + 2):
        failing = 1 <= step <= steps
        if step == 1 and edit != "none":
            with torch.no_grad():
                (frozen if edit == "frozen" else model[0].weight).add_(1.0)
        check._take = _raising if failing else real  # type: ignore[method-assign]
        ctx = Context(step, 0)
        try:
            alerts = check.before_step(ctx)
        except RuntimeError:
            alerts = []
            assert failing
        if step == steps + 1:
            rules = {a.rule for a in alerts}
            print(edit, steps, [(a.rule, a.message[:80]) for a in alerts])
            assert ("TG1301" in rules) == (edit == "frozen")
            assert "TG1315" in rules  # the trained weights moved across the gap
            assert all(a.severity >= Severity.HIGH for a in alerts)
        check._take = real  # type: ignore[method-assign]
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        check.after_step(ctx)  # the step's post-hook: its gradients still held
        opt.zero_grad(set_to_none=True)
    # A later boundary compares as ever: nothing changed since the last step.
    assert check.before_step(Context(steps + 2, 0)) == []


def _raising(named: Any) -> Any:
    raise RuntimeError("blinded")


def test_a_moment_swapped_for_a_subclass_view_is_named_at_its_step() -> None:
    """A subclass view shares the moment's bits (an equal fingerprint); its
    ``__torch_function__`` could show the guard other values than the optimizer uses. The
    type of a watched tensor may not change between steps: TG1302 at that step."""
    rng = seeded()
    torch.manual_seed(rng.randrange(2**31))
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    opt = rng.choice([torch.optim.Adam, torch.optim.AdamW])(model.parameters(), lr=1e-2)
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None)
    at = rng.randrange(2, 8)
    for step in range(at + 2):
        if step == at:
            p = rng.choice(list(model.parameters()))
            slot = rng.choice(["exp_avg", "exp_avg_sq"])
            opt.state[p][slot] = opt.state[p][slot].as_subclass(subclass(Trap("any", 0)))
        loss = model(torch.randn(8, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
    guard.close()
    found = [(a.rule, a.step, a.message[:80]) for a in guard.alerts]
    print(at, found)
    assert [a.step for a in guard.alerts if a.rule == "TG1302"][:1] == [at], found
    assert not [a for a in guard.alerts if a.severity >= Severity.HIGH and a.step < at], found
