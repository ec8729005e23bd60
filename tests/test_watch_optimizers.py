"""Several optimizers over one model (monitor/optimizers.py), generated.

Each run draws a composition: 2 or 3 optimizers (SGD, Adam, AdamW, RMSprop) over
disjoint parts of a small model, one or two param groups each, a scheduler per
optimizer or none (or a loop that sets one optimizer's learning rate itself and
declares it), an order in which they step at each step (GAN-style alternation), a
period (one stepping every k steps) and repeats (a further one stepping twice per
step, as a WGAN's critic), a frozen part no optimizer owns, the others' parameters
frozen while one steps (CycleGAN) or not, exact or budget mode.  Honest runs raise
nothing at high or critical; a sabotage of one optimizer (its update flipped inside
its step, its weights edited between steps, its learning rate changed) or of the
frozen part is caught at high or above at its step, naming the optimizer (or "no
optimizer").
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.seeds import seeded
from trainguard.errors import UsageError
from trainguard.findings import Severity
from trainguard.monitor import guard as tgw
from trainguard.monitor.optimizers import NO_OWNER

torch.set_num_threads(1)

KINDS = {
    "SGD": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
    "Adam": lambda g: torch.optim.Adam(g, lr=3e-3),
    "AdamW": lambda g: torch.optim.AdamW(g, lr=3e-3, weight_decay=0.01),
    "RMSprop": lambda g: torch.optim.RMSprop(g, lr=1e-3),
}
SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
}
STEPS = 30
WORKER = (sys.executable, "-m", "tests.multiopt_worker")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Linear(8, 16)
        self.body = torch.nn.Linear(16, 16)
        self.frozen = torch.nn.Linear(16, 16)  # no optimizer owns it
        self.head = torch.nn.Linear(16, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.emb(x))
        h = torch.relu(self.body(h)) + self.frozen(h)
        return self.head(h)


@dataclass
class Plan:
    kinds: list[str]
    parts: list[list[str]]  # module names per optimizer
    groups: list[int]  # param groups per optimizer (1 or 2)
    schedulers: list[str | None]
    manual: int | None  # the optimizer whose lr the loop sets and declares
    period: list[int]  # optimizer i steps when step % period[i] == phase[i]
    phase: list[int]
    order: list[int]
    repeat: list[int]  # steps per due step (a WGAN's critic steps several times)
    named: bool  # watch(model, {"name": opt}) instead of a list
    budget: float | None
    toggle: bool  # CycleGAN's set_requires_grad: the others' parameters frozen meanwhile
    sabotage: dict[str, Any] = field(default_factory=dict)


def draw(rng: random.Random) -> Plan:
    n = rng.choice([2, 3])
    modules = ["emb", "body", "head"]
    rng.shuffle(modules)
    cuts = sorted(rng.sample([1, 2], n - 1)) if n == 3 else [rng.choice([1, 2])]
    bounds = [0, *cuts, 3]
    parts = [modules[bounds[i] : bounds[i + 1]] for i in range(n)]
    period = [rng.choice([1, 1, 2, 3]) for _ in range(n)]
    period[rng.randrange(n)] = 1  # something steps at every step
    schedulers: list[str | None] = [rng.choice([None, *SCHEDULERS]) for _ in range(n)]
    unscheduled = [i for i in range(n) if schedulers[i] is None]
    manual = rng.choice([None, *unscheduled]) if unscheduled else None
    return Plan(
        kinds=[rng.choice(list(KINDS)) for _ in range(n)],
        parts=parts,
        groups=[rng.choice([1, 2]) if len(p) > 1 else 1 for p in parts],
        schedulers=schedulers,
        manual=manual,
        period=period,
        phase=[rng.randrange(k) for k in period],
        order=rng.sample(range(n), n),
        repeat=[1] + [rng.choice([1, 1, 2]) for _ in range(n - 1)],
        named=rng.random() < 0.5,
        budget=rng.choice([None, None, 0.5]),
        toggle=rng.random() < 0.5,
    )


def build(plan: Plan, model: Net) -> list[torch.optim.Optimizer]:
    opts = []
    for kind, part, groups in zip(plan.kinds, plan.parts, plan.groups, strict=True):
        params = [list(getattr(model, m).parameters()) for m in part]
        if groups == 1:
            given: Any = [p for ps in params for p in ps]
        else:  # the first module in a group of its own, at half the learning rate
            base = KINDS[kind]([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"]
            rest = [p for ps in params[1:] for p in ps]
            given = [{"params": params[0], "lr": base / 2}, {"params": rest}]
        opts.append(KINDS[kind](given))
    return opts


def run(plan: Plan, seed: int, **options: Any) -> tuple[tgw.Guard, list[str]]:
    torch.manual_seed(seed)
    model = Net()
    opts = build(plan, model)
    scheds = [SCHEDULERS[s](o) if s else None for s, o in zip(plan.schedulers, opts, strict=True)]
    names = [f"net{i}" for i in range(len(opts))]
    given: Any = dict(zip(names, opts, strict=True)) if plan.named else list(opts)
    guard = tgw.watch(
        model,
        given,
        scheduler=[s for s in scheds if s is not None] or None,
        budget=plan.budget,
        min_stall_seconds=0.25,
        **options,
    )
    labels = [
        f"{names[i] if plan.named else f'optimizer {i}'} ({type(o).__name__})"
        for i, o in enumerate(opts)
    ]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    bad = plan.sabotage
    for step in range(STEPS):
        if bad and bad["step"] == step and bad["kind"] in ("edit", "unowned"):
            with torch.no_grad():  # between guard.step(step - 1) and this step
                target = model.frozen if bad["kind"] == "unowned" else getattr(model, bad["module"])
                target.weight.add_(0.01)
        lr = None
        if plan.manual is not None:
            for group in opts[plan.manual].param_groups:
                group["lr"] = 1e-3 * (1 + (step % 5))
            lr = [group["lr"] for o in opts for group in o.param_groups]
        due = [i for i in plan.order if step % plan.period[i] == plan.phase[i]]
        for i in [d for d in due for _ in range(plan.repeat[d])]:
            idx = torch.randint(0, len(x), (32,), generator=g)
            others = [p for j, o in enumerate(opts) if j != i for p in _held(o)]
            if plan.toggle:
                for p in others:
                    p.requires_grad_(False)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opts[i].zero_grad()
            loss.backward()  # without toggle the others get gradients too, as in a GAN
            hook = None
            if bad and bad["kind"] == "flip" and bad["step"] == step and bad["victim"] == i:

                def flip(opt: Any, args: Any, kwargs: Any) -> None:
                    for group in opt.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.neg_()

                hook = opts[i].register_step_pre_hook(flip)  # after the guard's: inside the step
            if bad and bad["kind"] == "lr" and bad["step"] == step and bad["victim"] == i:
                opts[i].param_groups[-1]["lr"] *= 3  # neither scheduled nor declared
            opts[i].step()
            if hook is not None:
                hook.remove()
            if scheds[i] is not None:
                scheds[i].step()
            for p in others if plan.toggle else []:
                p.requires_grad_(True)
        guard.step(loss=loss, batch=x[idx], lr=lr)
    guard.close()
    return guard, labels


def _held(opt: torch.optim.Optimizer) -> list[Any]:
    return [p for group in opt.param_groups for p in group["params"]]


def high(guard: tgw.Guard) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(3))
def test_honest_compositions_raise_nothing_high(case: int, tmp_path: Path) -> None:
    from trainguard.ledger import open_ledger, verify_ledger

    rng = seeded()
    plan = draw(rng)
    print(plan)
    url = str(tmp_path / "run.sqlite")
    guard, labels = run(plan, rng.randrange(2**31), ledger=url, run_id="r")
    assert high(guard) == [], [(a.rule, a.step, a.message) for a in high(guard)]
    # The ledger: each further optimizer's fingerprints in every step record, and how
    # often it stepped; between its steps its "before" is its last "after" (exact mode;
    # the record holds the last of several steps in one guard.step).
    with open_ledger(url, create=False) as ledger:
        records = list(ledger.records("r"))
        assert verify_ledger(ledger, "r") == []
    start = next(r for r in records if r.kind == "run-start").payload["optimizers"]
    assert start["labels"] == labels and list(start["lanes"]) == labels[1:]
    steps = [r.payload["optimizers"] for r in records if r.kind == "step"]
    assert len(steps) == STEPS
    for i, label in enumerate(labels[1:], 1):
        due = [t % plan.period[i] == plan.phase[i] for t in range(STEPS)]
        assert [s[label]["steps"] for s in steps] == [plan.repeat[i] * d for d in due]
        if plan.budget is None and plan.repeat[i] == 1:
            for a, b in itertools.pairwise(steps):
                assert b[label]["before"] == a[label]["after"]


@pytest.mark.parametrize("kind", ["flip", "edit", "unowned", "lr"])
def test_sabotage_of_one_optimizer_is_named_at_its_step(kind: str) -> None:
    rng = seeded()
    plan = draw(rng)
    # Within the warm-up, budget mode runs every check at every step (monitor/budget.py).
    at = rng.randrange(3, 14)
    stepping = [i for i in range(len(plan.kinds)) if at % plan.period[i] == plan.phase[i]]
    victim = rng.choice(stepping if kind in ("flip", "lr") else range(len(plan.kinds)))
    module = rng.choice(plan.parts[victim])
    plan.sabotage = {"kind": kind, "step": at, "victim": victim, "module": module}
    print(plan)
    guard, labels = run(plan, rng.randrange(2**31))
    want = NO_OWNER if kind == "unowned" else labels[victim]
    found = [a for a in high(guard) if a.step == at and a.evidence.get("optimizer") == want]
    assert found, [(a.rule, a.step, a.severity, a.message) for a in guard.alerts]
    rule = {"flip": "TG1306", "lr": "TG1303"}.get(kind, "TG1301")
    assert rule in {a.rule for a in found}
    assert all(want in a.message for a in found)
    early = [a for a in high(guard) if a.step < at]
    assert early == [], [(a.rule, a.step, a.message) for a in early]


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    model = Net()
    a = torch.optim.SGD(model.emb.parameters(), lr=0.1)
    b = torch.optim.Adam([*model.emb.parameters(), *model.head.parameters()])
    with pytest.raises(UsageError, match="each parameter must belong to one optimizer"):
        tgw.watch(model, [a, b])
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.body.parameters(), lr=0.1), 5)
    c = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="steps none of the optimizers"):
        tgw.watch(model, [a, c], scheduler=sched)


def test_lightning_gan_with_two_optimizers_is_watched_and_clean(tmp_path: Any) -> None:
    """Manual optimization, a generator and a discriminator, alternating, the
    discriminator's parameters frozen during the generator's step (Lightning's GAN
    example); a discriminator weight edited between two steps is named at its step."""
    pl = pytest.importorskip("pytorch_lightning")
    from trainguard.monitor.integrations import LightningWatchCallback

    rng = seeded()
    edit_at = rng.randrange(3, 12)

    class GAN(pl.LightningModule):  # type: ignore[misc]
        def __init__(self, edit: bool) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gen = torch.nn.Linear(4, 4)
            self.disc = torch.nn.Linear(4, 1)
            self.edit = edit

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt_g, opt_d = self.optimizers()
            (real,) = batch
            if self.edit and batch_idx == edit_at:
                with torch.no_grad():
                    self.disc.bias.add_(1e-3)
            fake = self.gen(torch.randn_like(real))
            loss_d = torch.nn.functional.softplus(self.disc(fake.detach())).mean()
            loss_d = loss_d + torch.nn.functional.softplus(-self.disc(real)).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.toggle_optimizer(opt_g)  # freezes the discriminator's parameters
            loss_g = torch.nn.functional.softplus(-self.disc(self.gen(torch.randn_like(real))))
            opt_g.zero_grad()
            self.manual_backward(loss_g.mean())
            opt_g.step()
            self.untoggle_optimizer(opt_g)

        def configure_optimizers(self) -> Any:
            opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-3)
            opt_d = torch.optim.SGD(self.disc.parameters(), lr=1e-2, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt_d, step_size=5, gamma=0.5)
            return [opt_g, opt_d], [sched]

    data = torch.utils.data.TensorDataset(torch.randn(128, 4, generator=torch.Generator()))
    for edit in (False, True):
        cb = LightningWatchCallback(hang_seconds=None, min_stall_seconds=30.0)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
            callbacks=[cb],
            max_epochs=1,
        )
        trainer.fit(GAN(edit), torch.utils.data.DataLoader(data, batch_size=8))
        assert cb.guard is not None and cb.guard.step_index == 16
        found = [(a.rule, a.step, a.evidence.get("optimizer")) for a in high(cb.guard)]
        assert found == ([("TG1301", edit_at, "optimizer 1 (SGD)")] if edit else []), found


def test_blinding_a_further_optimizer_is_critical_at_its_step() -> None:
    """The guard's self-check (monitor/integrity.py) covers each lane's own checks: its
    list emptied, a check's sample indices cut, or a method shadowed is TG1304 critical
    at the next hook or guard.step."""
    rng = seeded()
    for how in ("empty", "index", "shadow"):
        torch.manual_seed(rng.randrange(999))
        model = Net()
        opts = [torch.optim.Adam(model.emb.parameters()), torch.optim.SGD(model.head.parameters())]
        opts.append(torch.optim.AdamW(model.body.parameters()))
        guard = tgw.watch(model, opts, hang_seconds=None, budget=rng.choice([None, 0.05]))
        lane = rng.choice(guard.lanes)
        at = rng.randrange(1, 6)
        for step in range(8):
            for opt in opts:
                loss = model(torch.randn(8, 8)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            guard.step(loss=loss)
            if step != at:
                continue
            if how == "empty":
                lane.checks[:] = []
            elif how == "index":
                owner = rng.choice([c for c in lane.checks if hasattr(c, "index")])
                key = rng.choice(list(owner.index))
                owner.index[key] = owner.index[key][:1]
            else:
                check = rng.choice(lane.checks)
                real = check.after_step
                check.after_step = lambda ctx, real=real: real(ctx)
        guard.close()
        tampered = [a for a in guard.alerts if "guard itself" in a.message]
        assert tampered, (how, guard.alerts)
        assert tampered[0].rule == "TG1304" and tampered[0].severity == Severity.CRITICAL
        assert tampered[0].step == at + 1, (how, tampered)
        assert not [a for a in guard.alerts if a.severity >= Severity.HIGH and a.step <= at]


def test_ranks_compare_every_optimizers_settings(tmp_path: Path) -> None:
    """Three replicas with two optimizers: one rank's second optimizer runs at another
    learning rate (set before watch(), so its own checks see no change); the rank
    comparison names it (TG1303), and nothing else is high on the others."""
    odd = seeded().randrange(3)
    port = _port()
    procs = [
        subprocess.Popen(
            [*WORKER, str(r), "3", str(port), str(tmp_path / f"rank{r}.json"), str(odd)],
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-800:]
    found = [
        (a["rule"], a["step"], a["evidence"].get("ranks"))
        for r in range(3)
        for a in json.loads((tmp_path / f"rank{r}.json").read_text())["alerts"]
        if a["severity"] in ("high", "critical")
    ]
    assert ("TG1303", 4, [odd]) in found, found
    assert {rule for rule, _, _ in found} <= {"TG1303", "TG1310"}, found
    assert all(ranks == [odd] for _, _, ranks in found), found


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_declared_writes_to_any_optimizers_weights(tmp_path: Path) -> None:
    """SAM's ascent and restore, and a Lookahead-like pull, inside guard.outside_step(),
    on the weights of every optimizer: recorded (TG1316, the outside-step record names
    each optimizer's tensors), nothing high; a write just before the block is not
    laundered by it (TG1301 naming its optimizer, at that step)."""
    from trainguard.ledger import open_ledger

    rng = seeded()
    launder = rng.randrange(3, 8)
    for dirty in (False, True):
        torch.manual_seed(rng.randrange(999))
        model = Net()
        opts = [torch.optim.SGD(model.emb.parameters(), lr=0.01)]
        opts += [torch.optim.Adam([*model.body.parameters(), *model.head.parameters()])]
        url = str(tmp_path / f"run{dirty}.sqlite")
        guard = tgw.watch(model, opts, hang_seconds=None, ledger=url, run_id="r")
        for step in range(10):
            for opt in opts:
                x = torch.randn(8, 8)
                if dirty and step == launder and opt is opts[1]:
                    with torch.no_grad():
                        model.head.bias.add_(1e-3)
                with guard.outside_step("sam"):
                    saved = [p.detach().clone() for p in model.parameters()]
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(1e-3 * torch.randn_like(p))
                    model(x).square().mean().backward()
                    with torch.no_grad():
                        for p, s in zip(model.parameters(), saved, strict=True):
                            p.copy_(s)
                        for p in opts[0].param_groups[0]["params"] + [model.head.weight]:
                            p.mul_(1 - 1e-3)  # and a pull, as Lookahead's: a real write
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            guard.step()
        guard.close()
        found = [(a.rule, a.step, a.evidence.get("optimizer")) for a in high(guard)]
        assert found == ([("TG1301", launder, "optimizer 1 (Adam)")] if dirty else []), found
        with open_ledger(url, create=False) as ledger:
            windows = [r.payload for r in ledger.records("r") if r.kind == "outside-step"]
        assert len(windows) == 20
        lane = [w["optimizers"]["optimizer 1 (Adam)"]["tensors"] for w in windows]
        late = 2 * launder + 1 if dirty else -1  # the window after the write holds it too
        assert lane == [["head.bias"] * (i == late) + ["head.weight"] for i in range(20)]
        assert all(w["tensors"] == ["emb.bias", "emb.weight"] for w in windows)


def test_accelerate_prepared_optimizers_and_scheduler() -> None:
    """``accelerator.prepare`` wraps each optimizer and the scheduler; the guard watches
    the optimizers inside and matches the scheduler through its wrapper: clean, and a
    learning rate changed under the wrapper is named with its optimizer."""
    accelerate = pytest.importorskip("accelerate")
    rng = seeded()
    bump = rng.randrange(2, 9)
    for bad in (False, True):
        torch.manual_seed(rng.randrange(999))
        acc = accelerate.Accelerator(cpu=True)
        model = Net()
        opt_g = torch.optim.Adam([*model.emb.parameters(), *model.body.parameters()], lr=1e-3)
        opt_d = torch.optim.SGD(model.head.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt_d, step_size=3, gamma=0.5)
        model, opt_g, opt_d, sched = acc.prepare(model, opt_g, opt_d, sched)
        guard = tgw.watch(model, [opt_g, opt_d], scheduler=sched, hang_seconds=None)
        for step in range(10):
            for opt in (opt_d, opt_g):
                if bad and step == bump and opt is opt_d:
                    opt_d.optimizer.param_groups[0]["lr"] *= 3
                loss = model(torch.randn(8, 8)).square().mean()
                opt.zero_grad()
                acc.backward(loss)
                opt.step()
            sched.step()
            guard.step(loss=loss)
        guard.close()
        found = [(a.rule, a.step, a.evidence.get("optimizer")) for a in high(guard)]
        assert found == ([("TG1303", bump, "optimizer 1 (SGD)")] if bad else []), found
