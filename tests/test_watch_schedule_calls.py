"""Schedulers recomputed from their observed step calls (TG1303; monitor/schedcalls.py).

Issue #12: honest loops were TG1303 high where the guard's copy of the scheduler could
not follow them (``CosineAnnealingWarmRestarts.step(epoch + i / iters)``, torch's own
documented form; a ``LambdaLR`` callable object that remembers its last factor; two
schedulers on one optimizer were refused at ``watch()``), while a per-epoch scheduler
stepped once more, or its ``last_epoch`` written (rewound, or moved one ahead), went
unseen.

Generated: an optimizer with one or two param groups and its schedulers, drawn from
torch's (closed-form and chainable ones, ``LambdaLR`` with a stateful callable object,
``CosineAnnealingWarmRestarts`` stepped with fractional epochs, ``ReduceLROnPlateau``
given the loss, ``CyclicLR``, ``OneCycleLR``), alone, in a ``SequentialLR`` or a
``ChainedScheduler``, or two on one optimizer (one per step, one per "epoch"), each
stepped per step or per epoch, exact or ``budget=0.02``.  The honest run is quiet;
the same run with one sabotage at a random step (one extra ``step()`` call of one of
the schedulers; its ``last_epoch`` moved one ahead or rewound through an earlier
``load_state_dict``; a setting of it changed; the learning rate written off the
schedule, exact mode) is TG1303 high at that step, and the same change declared
(``changed=["scheduler"]`` with ``lr=``) is quiet.  Seed printed; rerun one with
TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402

nn = torch.nn
S = torch.optim.lr_scheduler
STEPS = 18
SETTINGS: tuple[str, ...] = ("gamma", "eta_min", "T_max", "end_factor", "total_iters", "factor")
SETTINGS += ("step_size", "power", "T_0", "warm", "max_lrs")


class Warm:
    """A LambdaLR factor that keeps state of its own (honest: its last factor)."""

    def __init__(self, warm: int) -> None:
        self.warm = warm
        self.last: float | None = None

    def __call__(self, s: int) -> float:
        self.last = min(1.0, (s + 1) / self.warm)
        return self.last


def one(rng: random.Random, opt: Any, momentum: bool) -> tuple[Any, str]:
    """A scheduler and how it is stepped: "" plain, "frac" with a fractional epoch,
    "metric" with the loss."""
    name = rng.choice(
        [
            *("step", "multistep", "exp", "cos", "linear", "const", "poly", "lambda", "mult"),
            *("restarts", "plateau", "cyclic", "onecycle"),
        ]
    )
    if name == "step":
        return S.StepLR(opt, step_size=rng.randint(1, 3), gamma=rng.choice([0.5, 0.8])), ""
    if name == "multistep":
        return S.MultiStepLR(opt, sorted(rng.sample(range(1, 8), 2)), gamma=0.5), ""
    if name == "exp":
        return S.ExponentialLR(opt, gamma=rng.uniform(0.8, 0.97)), ""
    if name == "cos":
        return S.CosineAnnealingLR(opt, T_max=rng.randint(4, 20), eta_min=1e-4), ""
    if name == "linear":
        return S.LinearLR(opt, start_factor=rng.uniform(0.1, 0.5), total_iters=6), ""
    if name == "const":
        return S.ConstantLR(opt, factor=0.5, total_iters=rng.randint(2, 6)), ""
    if name == "poly":
        return S.PolynomialLR(opt, total_iters=30, power=rng.choice([1.0, 2.0])), ""
    if name == "lambda":
        return S.LambdaLR(opt, Warm(rng.randint(3, 8))), ""
    if name == "mult":
        return S.MultiplicativeLR(opt, lambda s: 0.95), ""
    if name == "restarts":
        return S.CosineAnnealingWarmRestarts(
            opt, T_0=rng.randint(1, 3), T_mult=rng.choice([1, 2])
        ), "frac"
    if name == "plateau":
        return S.ReduceLROnPlateau(opt, factor=0.5, patience=rng.randint(0, 2)), "metric"
    if name == "cyclic":
        return S.CyclicLR(opt, 1e-3, 0.05, step_size_up=3, cycle_momentum=momentum), ""
    return S.OneCycleLR(opt, max_lr=0.05, total_steps=200, cycle_momentum=momentum), ""


def schedulers(rng: random.Random, opt: Any, momentum: bool) -> tuple[list[Any], list[str], str]:
    """The schedulers registered, how each is stepped ("step", "epoch", "frac", "metric"
    per step or epoch), and the composition's name."""
    shape = rng.choice(["one", "sequential", "chained", "two"])
    if shape == "sequential":
        first = S.LinearLR(opt, start_factor=0.2, total_iters=4)
        then = rng.choice([S.StepLR(opt, 3, 0.5), S.CosineAnnealingLR(opt, T_max=STEPS)])
        return [S.SequentialLR(opt, [first, then], milestones=[4])], ["step"], shape
    if shape == "chained":
        a = S.ExponentialLR(opt, gamma=0.9)
        b = rng.choice([S.LinearLR(opt, 0.3, total_iters=5), S.StepLR(opt, 4, 0.5)])
        return [S.ChainedScheduler([a, b])], ["step"], shape
    if shape == "two":  # a per-step warm-up and a per-epoch decay (detectron2, mmdet)
        warm = rng.choice([S.LinearLR(opt, 0.1, total_iters=8), S.LambdaLR(opt, Warm(6))])
        decay = rng.choice([S.MultiStepLR(opt, [2, 3], 0.5), S.StepLR(opt, 1, 0.7)])
        return [warm, decay], ["step", "epoch"], shape
    sched, how = one(rng, opt, momentum)
    every = rng.choice(["step", "epoch"]) if how != "frac" else "step"
    return [sched], [f"{every}{'+' + how if how else ''}"], f"one {type(sched).__name__}"


def drive(sched: Any, how: str, step: int, epoch: int, loss: float) -> None:
    """One step of ``sched`` as the loop makes it."""
    if "frac" in how:
        sched.step(step // epoch + (step % epoch) / epoch)
    elif "metric" in how:
        sched.step(loss)
    else:
        sched.step()


def due(how: str, step: int, epoch: int) -> bool:
    return not how.startswith("epoch") or step % epoch == epoch - 1


def extra(sched: Any, how: str, step: int, epoch: int, loss: float) -> None:
    """The attacker's extra call, from a place of its own, in the loop's form."""
    if "frac" in how:
        sched.step(step // epoch + (step % epoch) / epoch)
    else:
        sched.step(loss) if "metric" in how else sched.step()


def setting(sched: Any) -> bool:
    """A setting of the scheduler (or a scheduler it holds) changed; False: none found."""
    found = [sched, *getattr(sched, "_schedulers", [])]
    for s in found:
        objects = [s, *[f for f in getattr(s, "lr_lambdas", []) if hasattr(f, "__dict__")]]
        for obj in objects:
            for key in SETTINGS:
                value = vars(obj).get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value:
                    continue
                setattr(obj, key, value * 2 if isinstance(value, int) else value * 1.5)
                return True
    return False


def run(
    rng: random.Random, attack: tuple[str, int] | None = None, declare: bool = False
) -> tuple[Any, str]:
    torch.manual_seed(rng.randrange(2**31))
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    groups: Any = list(model.parameters())
    if rng.random() < 0.4:
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    momentum = rng.random() < 0.6
    if momentum:
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(groups, lr=0.01)
    scheds, hows, shape = schedulers(rng, opt, momentum)
    budget = rng.choice([None, 0.02])
    epoch = rng.randint(3, 5)
    victim = rng.randrange(len(scheds))
    factor = rng.choice([0.5, 2.0])
    given: Any = scheds[0] if len(scheds) == 1 else scheds
    guard = trainguard.watch(
        model, opt, ledger=None, hang_seconds=None, scheduler=given, budget=budget
    )
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    early = None
    loss = torch.tensor(1.0)
    for step in range(STEPS):
        said: Any = None
        if step == 2:
            early = copy.deepcopy(scheds[victim].state_dict())
        if attack is not None and step == attack[1]:
            how = attack[0]
            if how in ("ahead", "rewind") and "frac" in hows[victim]:
                how = "setting"  # its next step sets the counters from the epoch given
            if how == "setting" and not setting(scheds[victim]):
                how = "extra"
            if how == "extra":
                extra(scheds[victim], hows[victim], step, epoch, float(loss))
            elif how == "ahead":  # ChainedScheduler keeps no counter: its first child's
                target = scheds[victim]
                (target if hasattr(target, "last_epoch") else target._schedulers[0]).last_epoch += 1
            elif how == "rewind":
                scheds[victim].load_state_dict(early)
            elif how == "lr":
                opt.param_groups[0]["lr"] *= factor
            said = ["scheduler"] if declare else None
        rates = [g["lr"] for g in opt.param_groups]  # what this step runs with
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for sched, how in zip(scheds, hows, strict=True):
            if due(how, step, epoch):
                drive(sched, how, step, epoch, float(loss))
        guard.step(loss=loss, changed=said, lr=rates if said else None)
    guard.close()
    label = f"{shape} {hows} budget={budget} epoch={epoch} victim={victim} {attack} {declare}"
    print(label)
    return guard, label


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_honest_schedules_are_quiet_and_each_sabotage_is_high_at_its_step() -> None:
    rng = seeded()
    for _ in range(5):
        state = rng.getstate()
        honest, label = run(rng)
        assert high(honest) == [], (label, [(a.rule, a.step, a.message) for a in high(honest)])
        at = rng.randrange(5, STEPS - 2)  # after the steps that set the cadence
        how = rng.choice(["extra", "ahead", "rewind", "setting", "lr"])
        rng.setstate(state)
        guard, label = run(rng, (how, at))
        if how == "lr" and "budget=0.02" in label:
            continue  # budget mode compares the param groups at drawn steps only
        found = [(a.rule, a.step, a.message[:160]) for a in high(guard)]
        assert found and found[0][:2] == ("TG1303", at), (label, found)
        rng.setstate(state)
        declared, label = run(rng, (how, at), declare=True)
        assert high(declared) == [], (label, [(a.rule, a.step, a.message) for a in high(declared)])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_scheduler_switch_is_declared_with_the_new_scheduler_or_the_rates_set() -> None:
    """SWALR taking over from a cosine schedule (torch's SWA recipe): declared with
    ``changed={"scheduler": swa}`` once, or with ``lr=`` every step, given as the rate
    the step ran with or as the rate the loop set after ``optimizer.step``: quiet.  An
    undeclared rate is high, and its message names what the guard expected."""
    rng = seeded()
    for form in ("switch", "ran", "set"):
        torch.manual_seed(rng.randrange(2**31))
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        cos = S.CosineAnnealingLR(opt, T_max=30)
        start = rng.randint(4, 10)
        budget = rng.choice([None, 0.02])
        guard = trainguard.watch(
            model, opt, ledger=None, hang_seconds=None, scheduler=cos, budget=budget
        )
        swa = None
        for step in range(start + 8):
            ran = opt.param_groups[0]["lr"]
            x = torch.randn(8, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            kw: dict[str, Any] = {}
            if step < start:
                cos.step()
            else:
                if swa is None:
                    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=4)
                    kw["changed"] = {"scheduler": swa} if form == "switch" else ["scheduler"]
                swa.step()
                if form == "ran":
                    kw["lr"] = ran
                elif form == "set":
                    kw["lr"] = opt.param_groups[0]["lr"]
            guard.step(loss=loss, **kw)
        guard.close()
        print(form, start, budget)
        assert high(guard) == [], (form, [(a.step, a.message) for a in high(guard)])
        assert type(swa) is torch.optim.swa_utils.SWALR  # its class given back at close
