"""Evasion classes of issue 12, generated: random routes, idioms and steps, fresh seed each run.

Each test prints its seed; rerun one with TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import functools
import math
import random
import time
import types
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.budget import WARMUP_STEPS  # noqa: E402


def high(guard: Any) -> list[tuple[str, int]]:
    return [(a.rule, a.step) for a in guard.alerts if a.severity >= Severity.HIGH]


# -- patching idioms: each returns an undo -------------------------------------------
def wraps_wrapper(owner: Any, name: str) -> Callable[[], None]:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*a: Any, **k: Any) -> Any:
        return original(*a, **k)

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def plain_replacement(owner: Any, name: str) -> Callable[[], None]:
    original = getattr(owner, name)
    setattr(owner, name, lambda *a, **k: original(*a, **k))
    return lambda: setattr(owner, name, original)


def code_swap(owner: Any, name: str) -> Callable[[], None]:
    """The same function object, another body (which here does the same thing)."""
    fn = getattr(owner, name)
    fn = getattr(fn, "__func__", fn)
    assert isinstance(fn, types.FunctionType)
    old = fn.__code__
    fn.__code__ = old.replace(co_consts=(*old.co_consts, "patched"))
    return lambda: setattr(fn, "__code__", old)


IDIOMS = [wraps_wrapper, plain_replacement]


def module_routes() -> list[tuple[Any, str]]:
    import torch.optim.adam as adam_mod
    import torch.utils.data._utils.fetch as fetch

    return [
        (adam_mod, "adam"),
        (adam_mod, "_single_tensor_adam"),
        (adam_mod, "_multi_tensor_adam"),
        (torch.optim.Adam, "_init_group"),
        (torch.optim.Adam, "step"),
        (torch.optim.Optimizer, "zero_grad"),
        (torch.nn.functional, "mse_loss"),
        (torch.nn.utils, "clip_grad_norm_"),
        (fetch._MapDatasetFetcher, "fetch"),
        (torch.utils.data._utils.collate, "default_collate"),
        (torch, "manual_seed"),
        (time, "perf_counter"),
    ]


def instance_patch(rng: random.Random) -> tuple[str, Callable[[Any, Any], Callable[[], None]]]:
    """A patch on the run's own objects: class swap, instance forward, hooks."""

    def class_swap(model: Any, opt: Any) -> Callable[[], None]:
        cls = type(opt)
        opt.__class__ = type("Sneaky" + cls.__name__, (cls,), {})
        return lambda: setattr(opt, "__class__", cls)

    def forward(model: Any, opt: Any) -> Callable[[], None]:
        layer = model[0]
        original = layer.forward
        layer.forward = functools.wraps(original)(lambda x: original(x))
        return lambda: layer.__dict__.pop("forward")

    def tensor_hook(model: Any, opt: Any) -> Callable[[], None]:
        return model[3].weight.register_hook(lambda g: g * 1.0).remove

    def module_hook(model: Any, opt: Any) -> Callable[[], None]:
        return model[3].register_full_backward_hook(lambda m, gi, go: None).remove

    def optimizer_hook(model: Any, opt: Any) -> Callable[[], None]:
        return opt.register_step_post_hook(lambda o, a, k: None).remove

    def global_hook(model: Any, opt: Any) -> Callable[[], None]:
        return torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None).remove

    options = [class_swap, forward, tensor_hook, module_hook, optimizer_hook, global_hook]
    choice = rng.choice(options)
    return choice.__name__, choice


def _at_step(
    at: int,
    make: Callable[[Any, Any], Callable[[], None]],
    undo: list[Callable[[], None]],
    step: int,
    model: Any,
    opt: Any,
) -> None:
    if step == at:
        undo.append(make(model, opt))


@pytest.mark.parametrize("budget", [None, 0.02])
def test_any_patch_of_a_watched_route_is_caught_at_the_next_step(budget: float | None) -> None:
    """Exact mode at any step; on a budget during the warm-up, when every check runs
    (after it, see the next test)."""
    rng = seeded()
    for _ in range(3):
        at = rng.randrange(3, 20 if budget is None else WARMUP_STEPS - 1)
        undo: list[Callable[[], None]] = []
        if rng.random() < 0.6:
            owner, name = rng.choice(module_routes())
            idiom = rng.choice(IDIOMS + ([code_swap] if name != "perf_counter" else []))
            what = f"{idiom.__name__} of {getattr(owner, '__name__', owner)}.{name}"
            make = functools.partial(lambda i, o, n, model, opt: i(o, n), idiom, owner, name)
        else:
            what, make = instance_patch(rng)
        patch = functools.partial(_at_step, at, make, undo)
        try:
            guard = sc.run(at + 3, optimizer="adam", sabotage=patch, budget=budget)
        finally:
            for u in undo:
                u()
        print(what, at, [(a.rule, a.step, a.message[:120]) for a in guard.alerts])
        assert ("TG1304", at + 1) in high(guard), what


def test_on_a_budget_a_patch_is_caught_at_the_first_step_the_identity_check_runs() -> None:
    """After the warm-up the identity check runs at the steps its schedule draws (at
    least 1 in SPARSEST on average): a route patched at step 20 is high at the first
    of them after it."""
    rng = seeded()
    owner, name = rng.choice(module_routes()[:-1])
    idiom = rng.choice(IDIOMS)
    undo: list[Callable[[], None]] = []
    make = functools.partial(lambda i, o, n, model, opt: i(o, n), idiom, owner, name)
    try:
        guard = sc.run(600, sabotage=functools.partial(_at_step, 20, make, undo), budget=0.02)
    finally:
        for u in undo:
            u()
    ran = [s for s in guard.schedule.recent["identity"] if s > 20]
    assert ran, "the identity check never ran in 580 steps"
    found = [s for r, s in high(guard) if r == "TG1304"]
    assert found and found[0] <= ran[0], (idiom.__name__, owner, name, ran[:3], found)


def test_what_was_installed_before_watch_is_reported_at_start_up() -> None:
    rng = seeded()
    model = sc.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    owner, name = rng.choice(module_routes()[:-1])  # the clock has its own test below
    hooks = {
        "tensor hook": lambda: model[3].weight.register_hook(lambda g: -g).remove,
        "optimizer hook": lambda: opt.register_step_pre_hook(lambda o, a, k: None).remove,
        "backward hook": lambda: model[3].register_full_backward_hook(lambda m, i, o: None).remove,
        f"{name} replaced": lambda: rng.choice(IDIOMS)(owner, name),
    }
    what = rng.choice(sorted(hooks))
    undo = hooks[what]()
    try:
        guard = sc.tgw.watch(model, opt, hang_seconds=None)
        if what == "tensor hook":  # judged by what it does (monitor/hookchain.py): one step
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            guard.step()
        guard.close()
    finally:
        undo()
    print(what, [(a.rule, a.step, a.message) for a in guard.alerts])
    if what == "tensor hook":  # medium at start, the flip it made TG1306 at step 0
        assert [(a.rule, a.step, a.severity) for a in guard.alerts] == [
            ("TG1304", 0, Severity.MEDIUM),
            ("TG1306", 0, Severity.CRITICAL),
        ], guard.alerts
        return
    # One alert per route it is found on (a class and the module holding it, say).
    assert guard.alerts, what
    assert {(a.rule, a.step, a.evidence.get("at_start")) for a in guard.alerts} == {
        ("TG1304", 0, True)
    }, what
    # High from the routes; the surface check (checks/surface.py) may name the same
    # function again at low, as code from outside installed packages in torch's namespaces.
    assert any(a.severity >= Severity.HIGH for a in guard.alerts)
    assert all(
        a.severity >= Severity.HIGH or (a.severity == Severity.LOW and name in a.message)
        for a in guard.alerts
    )


def test_a_forward_hook_present_at_start_up_is_medium_and_an_honest_start_is_silent() -> None:
    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = sc.tgw.watch(model, opt, hang_seconds=None)
    guard.close()
    assert guard.alerts == []
    handle = model[0].register_forward_hook(lambda m, i, o: None)
    guard = sc.tgw.watch(model, opt, hang_seconds=None)
    guard.close()
    handle.remove()
    assert [(a.rule, a.severity) for a in guard.alerts] == [("TG1304", Severity.MEDIUM)]


def test_a_patched_clock_neither_hides_a_sleep_nor_goes_unreported() -> None:
    real = time.perf_counter
    frozen = [real()]

    def sleep_then_patch(step: int, model: Any, opt: Any) -> None:
        if step == 30:
            time.perf_counter = lambda: frozen[0]  # every step now looks instant
        if step >= 30 and step % 3 == 0:
            time.sleep(0.4)

    try:
        guard = sc.run(45, sabotage=sleep_then_patch)
    finally:
        time.perf_counter = real
    assert ("TG1304", 31) in high(guard)
    slow = [a for a in guard.alerts if a.rule == "TG1307"]
    assert slow and all(a.evidence["seconds"] > 0.3 for a in slow)


def test_repeated_alerts_are_one_per_group_and_window_with_the_evidence_in_the_ledger(
    tmp_path: Any,
) -> None:
    from trainguard.ledger import open_ledger

    def every_step(step: int, model: Any, opt: Any) -> None:
        if step >= 10:
            with torch.no_grad():
                model[3].bias.add_(1e-3)

    url = str(tmp_path / "run.sqlite")
    guard = sc.run(40, sabotage=every_step, ledger=url, run_id="r")
    assert [(a.rule, a.step, a.count) for a in guard.alerts] == [("TG1301", 11, 29)]
    ledger = open_ledger(url)
    records = list(ledger.records("r"))
    ledger.close()
    assert [r.payload["rule"] for r in records if r.kind == "alert"] == ["TG1301"]
    repeats = [r.payload for r in records if r.kind == "alert-repeats"]
    assert len(repeats) == 1 and repeats[0]["steps"] == list(range(12, 40))


def test_honest_runs_of_every_optimizer_raise_nothing_high() -> None:
    rng = seeded()
    for name in sc.OPTIMIZERS:
        options = {"scheduler": rng.random() < 0.5, "budget": rng.choice([None, 0.02])}
        guard = sc.run(40, optimizer=name, **options)
        assert high(guard) == [], (name, options, guard.alerts)
        update = next(c for c in guard.checks if type(c).__name__ == "UpdateModelCheck")
        assert update.ratio is not None and abs(update.ratio - 1) < 1e-3, name


def _bad_update(kind: str, factor: float, at: int) -> Callable[[Any, Any, Any], None]:
    """A step post-hook, registered before watch(), that alters the update from step ``at``."""
    seen = {"steps": 0}
    before: dict[int, Any] = {}

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        before.clear()
        before.update({id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]})

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        seen["steps"] += 1
        if seen["steps"] - 1 < at:
            return
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    old = before[id(p)]
                    scale = {"flip": -1.0, "skip": 0.0, "scale": factor}[kind]
                    p.copy_(old + scale * (p - old))

    def install(opt: Any) -> None:
        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)

    return install  # type: ignore[return-value]


def test_a_flipped_scaled_or_skipped_update_is_caught_whichever_optimizer_runs() -> None:
    rng = seeded()
    for _ in range(4):
        name = rng.choice(sorted(sc.OPTIMIZERS))
        kind = rng.choice(["flip", "skip", "scale"])
        factor = rng.choice([rng.uniform(0.05, 0.6), rng.uniform(1.6, 5.0)])
        at = rng.randrange(2, 25)
        model = sc.make_model()
        opt = sc.OPTIMIZERS[name](list(model.parameters()))
        _bad_update(kind, factor, at)(opt)  # type: ignore[call-arg]
        guard = sc.tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=0.25)
        x, y = sc.make_data()
        for _ in range(at + 2):
            idx = torch.randint(0, len(x), (32,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=(x[idx], y[idx]))
        guard.close()
        what = (name, kind, round(factor, 3), at)
        print(what, [(a.rule, a.step, a.message[:100]) for a in guard.alerts])
        math = [a.step for a in guard.alerts if a.rule == "TG1306" and "math gives" in a.message]
        assert math and math[0] == at, what
        assert all(a.severity >= Severity.HIGH for a in guard.alerts if "math gives" in a.message)


def test_honest_schedules_manual_lr_and_declared_reseeds_raise_nothing_high() -> None:
    rng = seeded()
    names = rng.sample(sorted(sc.SCHEDULERS), 3)
    for name in names:
        guard = sc.run(40, optimizer=rng.choice(["sgd", "adamw", "adam"]), scheduler=name)
        assert high(guard) == [], (name, guard.alerts)

    def nanogpt_lr(it: int) -> float:
        return 3e-3 * min(1.0, (it + 1) / 10) * (0.55 + 0.45 * math.cos(it / 40 * math.pi))

    guard = sc.run(40, manual_lr=nanogpt_lr, reseed_every=rng.randrange(5, 15), data_check=True)
    assert high(guard) == [], guard.alerts


def test_a_schedule_forged_or_bent_is_caught_at_its_step() -> None:
    rng = seeded()
    name = rng.choice(["step", "exponential", "cosine", "multistep", "lambda"])
    at = rng.randrange(3, 30)
    how = rng.choice(["forged last lr", "gamma", "undeclared manual lr"])

    def bend(step: int, model: Any, opt: Any) -> None:
        if step != at - 1:
            return
        group = opt.param_groups[0]
        if how == "gamma":
            sched = bend.scheduler  # type: ignore[attr-defined]
            for attr in ("gamma", "T_max", "base_lrs"):
                if hasattr(sched, attr):
                    value = getattr(sched, attr)
                    setattr(
                        sched,
                        attr,
                        [v * 3 for v in value] if isinstance(value, list) else value * 3,
                    )
                    return
        new = group["lr"] * rng.choice([0.3, 3.0])
        group["lr"] = new
        if how == "forged last lr":
            bend.scheduler._last_lr = [new]  # type: ignore[attr-defined]

    original = sc.SCHEDULERS[name]

    def keep(o: Any) -> Any:
        bend.scheduler = original(o)  # type: ignore[attr-defined]
        return bend.scheduler  # type: ignore[attr-defined]

    sc.SCHEDULERS["test"] = keep
    try:
        guard = sc.run(at + 3, optimizer="sgd", scheduler="test", sabotage=bend)
    finally:
        del sc.SCHEDULERS["test"]
    print(name, how, at, [(a.rule, a.step, a.message[:90]) for a in guard.alerts])
    assert ("TG1303", at) in high(guard), (name, how)


def test_a_replaced_or_frozen_parameter_and_a_private_generator_reseed_are_caught() -> None:
    rng = seeded()
    at = rng.randrange(3, 30)
    how = rng.choice(["replace", "freeze", "loader generator"])
    x, y = sc.make_data(256)
    gen = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen
    )
    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = sc.tgw.watch(model, opt, dataloader=loader, hang_seconds=None, min_stall_seconds=0.25)
    step = 0
    while step <= at + 1:
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=(xb, yb))
            if step == at - 1:
                if how == "replace":
                    model[3].weight = torch.nn.Parameter(model[3].weight.detach().clone())
                elif how == "freeze":
                    model[0].weight.requires_grad_(False)
                else:
                    gen.manual_seed(7)
            step += 1
            if step > at + 1:
                break
    guard.close()
    print(how, at, [(a.rule, a.step, a.message[:90]) for a in guard.alerts])
    rule = "TG1305" if how == "loader generator" else "TG1301"
    assert (rule, at) in high(guard), how


def test_a_poisoned_label_is_caught_when_the_loop_passes_only_its_inputs() -> None:
    rng = seeded()
    x, y = sc.make_data(96)
    victim, start_epoch = rng.randrange(len(x)), rng.randrange(1, 3)

    class Labels(torch.utils.data.Dataset[tuple[Any, Any]]):
        epoch = 0

        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            if self.epoch >= start_epoch and i == victim:
                return x[i], -y[i]  # the label flipped, the input untouched
            return x[i], y[i]

    data = Labels()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = sc.tgw.watch(model, opt, dataloader=loader, data_check=True, hang_seconds=None)
    poisoned_at = None
    for epoch in range(start_epoch + 1):
        data.epoch = epoch
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=xb)  # inputs only
            if poisoned_at is None and epoch == start_epoch and bool((yb == -y[victim]).any()):
                poisoned_at = guard.step_index - 1
    guard.close()
    found = [(a.rule, a.step, a.evidence.get("index")) for a in guard.alerts]
    assert ("TG1309", poisoned_at, victim) in found, (victim, start_epoch, found)


def test_small_sleeps_on_every_step_are_found_and_attributed_to_their_phase() -> None:
    rng = seeded()
    phase = rng.choice(["compute", "optimizer"])
    at = rng.randrange(30, 45)
    pause = rng.uniform(0.012, 0.03)
    model = sc.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = {"n": 0}

    def sleepy(o: Any, a: Any, k: Any) -> None:
        if steps["n"] >= at:
            time.sleep(pause)

    # Registered before watch(): a pre-hook runs before the guard's (compute phase), a
    # post-hook before the guard's post-hook (inside the optimizer phase).
    (opt.register_step_pre_hook if phase == "compute" else opt.register_step_post_hook)(sleepy)
    guard = sc.tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=0.25)
    x, y = sc.make_data()
    for step in range(at + 60):
        steps["n"] = step
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, batch=(x[idx], y[idx]))
    guard.close()
    slow = [a for a in guard.alerts if a.rule == "TG1307" and a.severity >= Severity.HIGH]
    print(phase, at, round(pause, 4), [(a.step, a.message[:120]) for a in slow])
    # Under load it takes longer: a step whose wait for a CPU exceeded the start-up one
    # counts only what the wait cannot explain (the wait may have fallen in this phase).
    assert slow and slow[0].evidence["phase"] == phase and at <= slow[0].step <= at + 40


def test_ledger_show_prints_an_alert_message_whole(tmp_path: Any, capsys: Any) -> None:
    from trainguard.cli.main import main

    def tamper(step: int, model: Any, opt: Any) -> None:
        if step == 5:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)  # four tensors: a message far over 60 characters

    url = str(tmp_path / "run.sqlite")
    guard = sc.run(8, sabotage=tamper, ledger=url, run_id="r")
    message = guard.alerts[0].message
    assert len(message) > 60
    assert main(["ledger", "show", "--ledger", url, "r"]) in (0, 1)
    assert message in capsys.readouterr().out
