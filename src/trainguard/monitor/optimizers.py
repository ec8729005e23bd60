"""Several optimizers over one model: ``watch(model, [opt_g, opt_d])``.

A GAN's generator and discriminator, separate optimizers for the embeddings and
the rest, a second optimizer for a head: each owns a disjoint part of the model
and steps on its own schedule (alternating, or every k steps).  Watched with one
optimizer, the other's steps are weights changing outside the watched step
(TG1301).  So every optimizer is a *lane*: the parameters its param groups hold,
checked at its own step hooks by the same checks the guard runs for one
optimizer (fingerprints between its steps, its hyper-parameters and scheduler,
its update and state models, the gradient probe, its code routes and hook
registries).  The first optimizer is the guard's own lane (its hooks run every
check of the guard); each further one is a :class:`Lane`, one more check in the
guard's list.

Why one guard with lanes, not one guard per optimizer: a weight change must be
attributed to exactly one step, the step of the optimizer that owns the
parameter, and parameters no optimizer owns must still alarm.  Separate guards
would each fingerprint the whole model (each other's steps are then tampering)
or would have to agree on who watches what; lanes split the model once, at
start-up, by ownership, and share the guard's step count, ledger, key and
alert sink.  Parameters no optimizer holds are watched by the first lane, and
checked at every ``guard.step`` (an optimizer that did not step this step has
its weights compared there instead: nothing may have moved).

Alerts about a lane's weights, state, settings or update (TG1301, TG1302,
TG1303, TG1306) name its optimizer (``evidence["optimizer"]``, and the
message's first words); changes to parameters no optimizer owns name
``"no optimizer"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.budget import WARMUP_STEPS, Schedule
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.checks.direction import UpdateDirectionCheck
from trainguard.monitor.checks.hyper import HyperparameterCheck
from trainguard.monitor.checks.identity import IdentityCheck
from trainguard.monitor.checks.params import ParameterIdentityCheck
from trainguard.monitor.checks.peers import PeerCheck
from trainguard.monitor.checks.state import StateModelCheck
from trainguard.monitor.checks.tamper import TamperCheck
from trainguard.monitor.checks.update import UpdateModelCheck
from trainguard.monitor.fingerprint import Fingerprinter
from trainguard.monitor.gradtransform import GradRules
from trainguard.monitor.options import WatchOptions
from trainguard.monitor.safety import StepNesting, checked, step_hooks
from trainguard.monitor.schedule import Schedulers, as_list
from trainguard.monitor.sharding import stepped_optimizer
from trainguard.monitor.stats import RobustWindow

# The rules whose alerts are about one optimizer's weights, state, settings or update.
OWNED_RULES = frozenset({"TG1301", "TG1302", "TG1303", "TG1306"})
NO_OWNER = "no optimizer"


class Optimizers:
    """The optimizers of one guard: their labels, who owns which parameter, their
    schedulers, and each one's share of what ``guard.step(lr=, hyper=)`` declares."""

    def __init__(self, optimizer: Any, model: Any, scheduler: Any) -> None:
        if isinstance(optimizer, Mapping):
            names, given = [str(k) for k in optimizer], list(optimizer.values())
        elif isinstance(optimizer, (list, tuple)):
            given = list(optimizer)
            names = [f"optimizer {i}" for i in range(len(given))]
        else:
            names, given = ["optimizer"], [optimizer]
        if not given:
            raise UsageError("watch: no optimizer given")
        self.all = [stepped_optimizer(o) for o in given]
        self.labels = [f"{n} ({type(o).__name__})" for n, o in zip(names, self.all, strict=True)]
        self.primary = self.all[0]
        self.several = len(self.all) > 1
        owner: dict[int, int] = {}
        problems = []
        if len({id(o) for o in self.all}) != len(self.all):
            problems.append("the same optimizer is given twice")
        for i, opt in enumerate(self.all):
            for group in opt.param_groups:
                for p in group["params"]:
                    was = owner.setdefault(id(p), i)
                    if was != i:
                        problems.append(
                            f"a parameter is held by {self.labels[was]} and {self.labels[i]}: "
                            "each parameter must belong to one optimizer"
                        )
        self.schedulers = self._match(scheduler, problems)
        if problems:
            raise UsageError("watch: " + "; ".join(dict.fromkeys(problems)))
        # Each parameter name's owner at start-up (None: no optimizer holds it).
        self.owner = {n: owner.get(id(p)) for n, p in model.named_parameters()}
        self._lr: list[list[float] | None] = [None] * len(self.all)
        self._hyper: list[Mapping[str, Any] | None] = [None] * len(self.all)

    def _match(self, scheduler: Any, problems: list[str]) -> list[Any]:
        """One scheduler (or None) per optimizer: a scheduler steps the optimizer it was
        made for (its ``.optimizer``), whatever order the list gives them in."""
        if scheduler is None:
            return [None] * len(self.all)
        if not isinstance(scheduler, (list, tuple)):
            if not self.several:
                return [scheduler]
            scheduler = [scheduler]
        found: list[Any] = [None] * len(self.all)
        for s in scheduler:
            # Accelerate's AcceleratedScheduler holds torch's scheduler as ``.scheduler``.
            inner = getattr(s, "scheduler", None)
            target = getattr(s, "optimizer", None) or getattr(inner, "optimizer", None)
            target = stepped_optimizer(target)
            at = [i for i, o in enumerate(self.all) if o is target]
            if not at:
                problems.append(f"scheduler {type(s).__name__} steps none of the optimizers given")
            elif any(s is t for t in as_list(found[at[0]])):
                problems.append(f"scheduler {type(s).__name__} is given twice")
            elif found[at[0]] is not None:
                # Two on one optimizer (a per-step warm-up and a per-epoch decay): the
                # guard replays both, in the order they step (monitor/schedule.py).
                found[at[0]] = Schedulers([*as_list(found[at[0]]), s])
            else:
                found[at[0]] = s
        return found

    def answered(self, named: list[tuple[str, Any]], lane: int) -> list[tuple[str, Any]]:
        """The parameters lane ``lane`` answers for: those its optimizer holds, and for
        the first lane also those no optimizer holds (all of them with one optimizer)."""
        if not self.several:
            return named
        return [
            (n, p) for n, p in named if self.owner.get(n) == lane or _first_unowned(self, n, lane)
        ]

    def view(self, model: Any, lane: int) -> Any:
        """The model as lane ``lane`` sees it (for the parameter identity check)."""
        return model if not self.several else _View(model, self, lane)

    # -- guard.step(lr=, hyper=) --------------------------------------------------------
    def declare(
        self, lr: float | list[float] | None, hyper: Mapping[str, Any] | None
    ) -> tuple[list[float] | None, Mapping[str, Any] | None]:
        """Split what the loop declared among the optimizers; returns the first's share.

        ``lr``: one value for every group of every optimizer, or a list with one per
        param group, the first optimizer's groups first.  ``hyper``: each value for
        every group, a list split the same way."""
        counts = [len(o.param_groups) for o in self.all]
        if lr is None:
            self._lr = [None] * len(self.all)
        elif isinstance(lr, (int, float)):
            self._lr = [[float(lr)] * c for c in counts]
        else:
            self._lr = list(_split(list(lr), counts)) if self.several else [lr]
        if not hyper or not self.several:
            self._hyper = [hyper] + [None] * (len(self.all) - 1)
        else:
            parts: list[dict[str, Any]] = [{} for _ in self.all]
            for key, value in hyper.items():
                pieces = _split(value, counts) if isinstance(value, list) else None
                for part in parts:
                    part[key] = next(pieces) if pieces is not None else value
            self._hyper = list(parts)
        return self._lr[0], self._hyper[0]

    # -- alerts -------------------------------------------------------------------------
    def tag(self, alerts: list[Alert]) -> list[Alert]:
        """Name the optimizer an alert is about (the guard's sink calls this with every
        alert when there are several optimizers); the first lane's by default."""
        out = []
        for a in alerts:
            if a.rule not in OWNED_RULES or "optimizer" in a.evidence:
                out.append(a)
                continue
            tensors = a.evidence.get("tensors")
            owners = (
                {self.owner.get(n, 0) for n in tensors if n in self.owner} if tensors else set()
            )
            labels = [NO_OWNER if o is None else self.labels[o] for o in _ordered(owners)]
            out.append(named(a, ", ".join(labels) or self.labels[0]))
        return out


def named(alert: Alert, label: str) -> Alert:
    """``alert`` naming the optimizer ``label``, in its evidence and its message."""
    return dataclasses.replace(
        alert, message=f"{label}: {alert.message}", evidence={**alert.evidence, "optimizer": label}
    )


def _first_unowned(found: Optimizers, name: str, lane: int) -> bool:
    return lane == 0 and found.owner.get(name, None) is None


def _ordered(owners: set[int | None]) -> list[int | None]:
    return sorted(owners, key=lambda o: -1 if o is None else o)


def _split(values: list[Any], counts: list[int]) -> Iterator[list[Any]]:
    """``values`` cut into consecutive pieces of ``counts`` (short at the end when
    fewer are given: groups without a value are undeclared)."""
    at = 0
    for c in counts:
        yield values[at : at + c]
        at += c


class _View:
    """The parameters one lane answers for, re-read from the model at each call (a
    parameter replaced under its name shows; one added under a new name belongs to
    the first lane, which answers for what no optimizer held at start-up)."""

    def __init__(self, model: Any, found: Optimizers, lane: int) -> None:
        self.model, self.found, self.lane = model, found, lane

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        for n, p in self.model.named_parameters():
            if self.found.owner.get(n) == self.lane or _first_unowned(self.found, n, self.lane):
                yield n, p


class Lane(Check):
    """One further optimizer: its own step hooks run its checks; ``step_end`` (in
    ``guard.step``) judges its declared settings, and compares its weights when it did
    not step.  Its alerts go to the guard's sink, at the guard's step, naming it."""

    def __init__(
        self,
        found: Optimizers,
        index: int,
        model: Any,
        fp: Fingerprinter,
        options: WatchOptions,
        *,
        times: RobustWindow,
        context: Callable[[], Context],
        raise_all: Callable[[list[Alert]], None],
        spent: Callable[[float], None],
        world_size: int,
    ) -> None:
        import torch

        self.found, self.index, self.label = found, index, found.labels[index]
        self._failures: Counter[str] = Counter()  # per check.phase (TG1315)
        self.optimizer = opt = found.all[index]
        self.context, self.raise_all, self.spent = context, raise_all, spent
        named_params = found.answered(list(model.named_parameters()), index)
        self.nesting = StepNesting()
        pre, post = step_hooks(self._before_step, self._after_step, self.nesting)
        self._hooks = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
        self.tamper = TamperCheck(
            fp,
            named_params,
            opt,
            times=times,
            every=options.every,
            budget=options.budget,
            world_size=world_size,
            sync_every=options.sync_every,
            tensor_digests=options.tensor_digests,
        )
        self.hyper = HyperparameterCheck(opt, found.schedulers[index])
        # This optimizer's class, module and hook registries (taken after our hooks are
        # in); the model's routes are the first lane's (an empty module adds none).
        self.identity = IdentityCheck(torch.nn.Module(), opt)
        update = UpdateModelCheck(named_params, opt, fp.key)
        self.direction = UpdateDirectionCheck(
            named_params, opt, fp.key, GradRules.of(options), norm_rule=False
        )
        # Its parameters' identity; a freeze declared at guard.step (step_end below).
        self.param_ids = ParameterIdentityCheck(found.view(model, index), opt)
        self.checks: list[Check] = [
            self.tamper,
            self.hyper,
            self.identity,
            self.direction,
            self.param_ids,
            StateModelCheck(update, fp.key),  # before `update`: it reads its samples
            update,
        ]
        self.schedule: Schedule | None = None  # budget mode: the guard's (set by the guard)
        self.stepped = False  # stepped since the last guard.step
        self._count = 0  # steps since the last guard.step
        self.steps = 0  # steps in the guard step that ended last (for its record)
        self._runs: frozenset[str] | None = None

    def _emit(self, alerts: list[Alert]) -> list[Alert]:
        # An alert naming its optimizer already (another one's weights: checks/peers.py).
        return [a if "optimizer" in a.evidence else named(a, self.label) for a in alerts]

    def start(self, ctx: Context) -> list[Alert]:
        return self._emit(self.identity.start(ctx))

    def _run(self, before: bool) -> None:
        started = clock.now()
        try:
            ctx = self.context()
            if before:
                due = self.tamper.due(ctx.step) or self.tamper.budget is not None
                ctx = Context(ctx.step, ctx.rank, due)
                sched = self.schedule
                self._runs = _drawn(sched, ctx.step) if sched is not None else None
                self.tamper.sampling = self._runs is None or "chunks" in self._runs
            for check in self.checks:
                self.raise_all(self._emit(self._hook(check, ctx, before)))
            if not before:
                self.stepped = True
                self._count += 1
        finally:
            self.spent(clock.now() - started)

    def _before_step(self) -> None:
        self._run(before=True)

    def _after_step(self) -> None:
        self._run(before=False)

    def _hook(self, check: Check, ctx: Context, before: bool) -> list[Alert]:
        """As the guard runs a check's step hook (budget mode: ``skipped`` when the
        schedule leaves its unit out of this step)."""
        phase = check.before_step if before else check.after_step
        name = f"{type(check).__name__} ({self.label})"
        when = "before_step" if before else "after_step"
        runs, unit, sched = self._runs, check.unit, self.schedule
        if runs is None or unit is None or sched is None:
            return checked(name, when, ctx, lambda: phase(ctx), self._failures)
        if unit not in runs:
            if not before:
                return []
            return checked(name, "skipped", ctx, lambda: check.skipped(ctx), self._failures)
        started = clock.now()
        try:
            return checked(name, when, ctx, lambda: phase(ctx), self._failures)
        finally:
            sched.charge(unit, clock.now() - started)

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        alerts = []
        if not self.stepped:
            # No step of this optimizer since the last guard.step (it steps every k
            # steps, or an update went around its hooks): its weights, state and code
            # must be as its last step left them, checked at this step.
            alerts += self.identity.before_step(ctx) + self.tamper.before_step(ctx)
            alerts += self.tamper.after_step(ctx)
        self.stepped, self.steps, self._count = False, self._count, 0
        self.nesting.reset()
        self.hyper.declare(self.found._hyper[self.index])
        mine = dataclasses.replace(end, declared_lr=self.found._lr[self.index])
        for check in (self.hyper, self.direction, self.param_ids):
            name = f"{type(check).__name__} ({self.label})"
            alerts += checked(
                name, "step_end", ctx, functools.partial(check.step_end, ctx, mine), self._failures
            )
        return self._emit(alerts)

    # -- guard.outside_step(): declared writes between two steps (monitor/declare.py) ----
    def enter_outside(self, ctx: Context) -> list[Alert]:
        """Nothing of this optimizer's may have changed since its last step."""
        return self._emit(self.tamper.enter_outside(ctx))

    def leave_outside(self) -> dict[str, Any]:
        """What the block wrote of this optimizer's: it is where its next step starts."""
        changed, digest = self.tamper.leave_outside()
        return {"tensors": changed, "after": digest}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for check in self.checks:
            check.close()


def start_record(found: Optimizers, lanes: list[Lane]) -> dict[str, Any]:
    """The run-start record's ``optimizers``: every label, and each further optimizer's
    parameters, state digests and settings (the first's are the record's own fields)."""
    return {
        "labels": found.labels,
        "lanes": {
            lane.label: {
                "param_names": lane.tamper.after.names(),
                "optimizer_names": lane.tamper.opt_names,
                "state": lane.tamper.state_digests(),
                "hyperparameters": lane.hyper.groups,
            }
            for lane in lanes
        },
    }


def step_record(lanes: list[Lane]) -> dict[str, Any]:
    """A step record's ``optimizers``: each further optimizer's fingerprints, as the
    record's own fields are the first's (those of its last step, when it stepped
    several times), and how often it stepped (0: compared at guard.step)."""
    return {lane.label: {"steps": lane.steps, **lane.tamper.fields} for lane in lanes}


def _drawn(sched: Schedule, step: int) -> frozenset[str]:
    """The units the schedule runs at ``step``, drawn as ``Schedule.runs`` draws them but
    not counted, and not cached: ``runs`` serves the guard's own hooks, which draw the
    next step ahead of it (a lane asking for this step in between would replace that).
    A lane's hooks use one draw for both of its hooks."""
    if step < WARMUP_STEPS or sched.budget >= 1.0:
        return frozenset(sched.chance)
    return frozenset(u for u, p in sched.chance.items() if sched.draw(u, step) < p)


def lanes(
    found: Optimizers,
    model: Any,
    fp: Fingerprinter,
    options: WatchOptions,
    **kw: Any,
) -> list[Lane]:
    """A :class:`Lane` for each optimizer after the first."""
    return [Lane(found, i, model, fp, options, **kw) for i in range(1, len(found.all))]


def peer_checks(found: Optimizers, own: TamperCheck, lanes: list[Lane]) -> list[Check]:
    """Each optimizer's step reads the weights the others own: at every lane's step
    pre-hook, the others' weights as their last steps left them (checks/peers.py).
    Returns the first lane's (the guard's own hooks run it)."""
    if not lanes:
        return []
    every = [(found.labels[0], own)] + [(lane.label, lane.tamper) for lane in lanes]
    for lane in lanes:
        others = [(label, t) for label, t in every if t is not lane.tamper]
        lane.checks.append(PeerCheck(lane.label, others, found.tag))
    return [PeerCheck(found.labels[0], every[1:], found.tag)]
