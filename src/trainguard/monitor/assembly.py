"""How a guard is put together: its checks, in the order alerts come, and the plan of
which of them act in which phase of a step (and, in budget mode, which units the
schedule draws).  Guard.__init__ calls these once; nothing here runs per step.
``guard`` is typed Any, as in integrity.py: naming Guard here would be an import cycle.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor import checks
from trainguard.monitor.alerts import Context
from trainguard.monitor.budget import Schedule
from trainguard.monitor.checks.base import Check
from trainguard.monitor.checks.environment import EnvironmentCheck
from trainguard.monitor.checks.hyper import HyperparameterCheck
from trainguard.monitor.checks.identity import IdentityCheck
from trainguard.monitor.checks.lossfn import loss_checks
from trainguard.monitor.checks.seeds import SeedCheck
from trainguard.monitor.checks.tamper import TamperCheck
from trainguard.monitor.checks.tensortypes import TensorTypeCheck
from trainguard.monitor.optimizers import lanes, peer_checks
from trainguard.monitor.samples import SampleRecorder
from trainguard.monitor.tensortypes import TypeJudge


def install_checks(guard: Any, own: Any) -> EnvironmentCheck | None:
    """Build the guard's checks onto it (``guard.checks`` and the named ones other parts
    read: tamper, hyper, identity, seeds, samples, lanes); return the environment check
    when the run was given a snapshot (its summary goes in the run-start record)."""
    opts, model, optimizer = guard.options, guard.model, guard.optimizer
    guard.seeds = SeedCheck(guard.dataloader)
    # Sealed data: which samples each batch came from (docs/data.md).
    guard.samples = SampleRecorder.for_loader(guard.dataloader, guard.key)
    loader = guard.dataloader if opts.data_check else None
    behaviour = checks.behaviour(
        model,
        optimizer,
        guard.fp,
        guard.windows,
        min_stall_seconds=opts.min_stall_seconds,
        dataloader=loader,
        owned=guard.optimizers.view(model, 0),
    )
    # Further optimizers: their hooks (step, gradient) are the guard's own too.
    guard.lanes = lanes(
        guard.optimizers,
        model,
        guard.fp,
        opts,
        times=guard.windows["time"],
        context=lambda: Context(guard.step_index, guard.rank),
        raise_all=guard.sink.raise_all,
        spent=guard._spent,
        world_size=guard.world_size,
    )
    # Gradient accumulation (monitor/accumulation.py): any optimizer's step separates two
    # backward passes for every probe; inside a step (a closure's re-evaluation) too.
    passes = guard.direction.probe.passes
    passes.nesting = guard._nesting
    for lane in guard.lanes:
        lane.direction.probe.passes.marks = passes.marks
        lane.direction.probe.passes.nesting = lane.nesting
    # Taken after the guard's own hooks and wrappers are in place.
    guard.identity = IdentityCheck(model, optimizer, guard.dataloader, opts.loss_fn)
    guard.hyper = HyperparameterCheck(optimizer, guard.scheduler)
    guard.tamper = TamperCheck(
        guard.fp,
        own,
        optimizer,
        times=guard.windows["time"],
        every=opts.every,
        budget=opts.budget,
        world_size=guard.world_size,
        sync_every=opts.sync_every,
        tensor_digests=opts.tensor_digests,
    )
    # The classes of the tensors the step computes with (checks/tensortypes.py).
    types = TensorTypeCheck(guard.named_params, optimizer, TypeJudge(opts.tensor_types))
    # The order alerts of one phase come in.
    guard.checks = [guard.tamper, types, guard.hyper, guard.identity, guard.seeds]
    guard.checks += [guard.direction, *behaviour, *checks.loader_draws(guard.dataloader)]
    guard.checks += loss_checks(opts.loss_fn, guard.fp)  # the criterion's settings, buffers
    guard.checks += guard.lanes
    # Each optimizer's step reads the others' weights (checks/peers.py).
    guard.checks += peer_checks(guard.optimizers, guard.tamper, guard.lanes)
    env = None
    if opts.env_snapshot is not None:
        env = EnvironmentCheck(opts.env_snapshot, opts.env_key, opts.env_paths)
        guard.checks.insert(0, env)
    return env


def plan_phases(guard: Any) -> None:
    """The budget schedule and, per phase, the checks with something to do in it."""
    budget = guard.options.budget
    # Budget mode: the checks whose cost grows with the model, and the chunk sample,
    # run at the steps this schedule draws with the run's key (monitor/budget.py).
    # The batch's fingerprint is a unit too: its cost follows the batch, not the guard;
    # and the guard's self-check (monitor/integrity.py).
    # Not the version counters between steps: they run at every step (checks/tamper.py).
    extra = {"chunks", "batch", "integrity"}
    units = sorted({c.unit for c in guard.checks if c.unit is not None} | extra)
    guard.schedule = Schedule(guard.key, budget, units) if budget else None
    guard.tamper.schedule = guard.schedule
    for lane in guard.lanes:
        lane.schedule = guard.schedule
    guard._runs = None  # the units running at this step
    guard._runs_at = -1  # the step guard._runs was drawn for
    # Units with hooks in backward: armed after each step's hooks for the next step.
    guard._armed = [c for c in guard.checks if c.unit is not None and acts(c, "arm")]
    # Per phase, the checks that do something in it (a scheduled unit's skipped()
    # stands in for its hooks): a call per check and phase is a fixed cost per step.
    # step_end runs whatever the schedule draws: only the checks that have one.
    guard._phase = {
        name: [c for c in guard.checks if c.unit is not None or acts(c, name)]
        for name in ("before_step", "after_step")
    }
    guard._phase["step_end"] = [c for c in guard.checks if acts(c, "step_end")]
    # The scheduled checks with something to do at a step their unit is left out of.
    guard._skippers = {id(c) for c in guard.checks if c.unit is not None and acts(c, "skipped")}


def acts(check: Check, phase: str) -> bool:
    """Whether ``check``'s class does something in ``phase`` (overrides Check's no-op)."""
    return getattr(type(check), phase) is not getattr(Check, phase)
