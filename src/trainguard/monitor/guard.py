"""``trainguard.watch``: attest every training step, and say when that stops being true.

Call ``guard.step(loss=loss, batch=inputs)`` right after ``optimizer.step()``.  The
step hooks run the checks of ``monitor/checks/`` before and after each step;
``guard.step`` the end-of-step ones, and writes the step's record.  Steps count from
0.  The guard orchestrates and records; it decides nothing itself.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import assembly, clock, conditions, declarable, integrity, terminate
from trainguard.monitor.alerts import Alert, Context, TrainingStopped
from trainguard.monitor.budget import Schedule
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.checks.direction import UpdateDirectionCheck
from trainguard.monitor.checks.hyper import HyperparameterCheck
from trainguard.monitor.checks.identity import IdentityCheck
from trainguard.monitor.checks.seeds import SeedCheck
from trainguard.monitor.checks.tamper import TamperCheck
from trainguard.monitor.checks.tracing import profiling as _profiling
from trainguard.monitor.declare import outside_step as _outside_step
from trainguard.monitor.fingerprint import Fingerprint, Fingerprinter
from trainguard.monitor.gradtransform import GradRules
from trainguard.monitor.optimizers import Lane, Optimizers, start_record, step_record
from trainguard.monitor.options import WatchOptions
from trainguard.monitor.recorder import Recorder, run_start, step_payload
from trainguard.monitor.safety import StepNesting, checked, step_hooks
from trainguard.monitor.samples import SampleRecorder
from trainguard.monitor.setup import rank_world, scalar, shared_key, tensors_in, total_grad_norm
from trainguard.monitor.sink import AlertSink
from trainguard.monitor.stats import BUDGET_REFRESH, RobustWindow
from trainguard.monitor.watchdog import Watchdog

__all__ = ["Alert", "Guard", "TrainingStopped", "WatchOptions", "watch"]


class Guard:
    """Watches one rank's training; see :class:`WatchOptions` for the options.

    ``optimizer``: one optimizer, or several over disjoint parts of the model (a list,
    or a dict naming them): monitor/optimizers.py."""

    # Built by monitor/assembly.py at start: the checks, and which act in which phase.
    checks: list[Check]
    tamper: TamperCheck
    hyper: HyperparameterCheck
    identity: IdentityCheck
    seeds: SeedCheck
    samples: SampleRecorder | None
    lanes: list[Lane]
    schedule: Schedule | None
    _runs: frozenset[str] | None  # the units running at this step
    _runs_at: int  # the step _runs was drawn for
    _armed: list[Check]  # units with hooks in backward, armed a step ahead
    _phase: dict[str, list[Check]]
    _skippers: set[int]

    def __init__(
        self, model: Any, optimizer: Any, options: WatchOptions | None = None, **kwargs: Any
    ) -> None:
        import torch

        opts = self.options = WatchOptions.from_kwargs(options, kwargs)
        self.torch = torch
        # Not Accelerate's wrapper (no hooks there); the first of several optimizers is
        # this guard's own lane, the others are checks of their own (Lane).
        self.optimizers = Optimizers(optimizer, model, opts.scheduler)
        optimizer = self.optimizers.primary
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.dataloader = self.optimizers.schedulers[0], opts.dataloader
        self.budget, self.measure_grad_norm = opts.budget, opts.measure_grad_norm
        self.run_id = opts.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.rank, self.world_size = rank_world(opts.rank, opts.world_size)
        self.key = opts.key or shared_key(self.world_size)
        self.fp = Fingerprinter(self.key)
        self.step_index = 0
        self.recorder = Recorder.for_run(opts, self.run_id, self.rank)
        self.ledger = self.recorder.ledger
        self._pending: dict[str, Any] | None = None
        tag = self.optimizers.tag if self.optimizers.several else None
        self.sink = AlertSink(self._record, opts.on_alert, tag)
        self.alerts = self.sink.alerts
        # Seconds spent in the guard during the current step, and during the last one.
        self._overhead = self.last_step_overhead = 0.0
        self._grad_norm: float | None = None
        self._declared: StepEnd | None = None  # what guard.step(lr=, reseed=) said
        self._last_step_end = self._step_started = self._pre_end = clock.now()
        self._finish_cost, self._phases = 0.0, dict[str, float]()
        # The guard's own seconds blocked (wall minus CPU minus run delay), and those of
        # its designed waits (ledger appends, the ranks' comparison): checks/timing.py.
        self._off = clock.OffCpu()
        self._waits = clock.OffCpu(self._off)  # the same schedstat file
        refresh = 1 if opts.budget is None else BUDGET_REFRESH  # budget: medians every N
        self.windows = {k: RobustWindow(refresh=refresh) for k in ("time", "loss", "grad_norm")}
        self.named_params = list(model.named_parameters())
        own = self.optimizers.answered(self.named_params, 0)  # all, with one optimizer

        self.direction = UpdateDirectionCheck(
            own, optimizer, self.key, GradRules.of(opts), norm_rule=not self.optimizers.several
        )
        # Bound now: an instance attribute shadowing them later does not reach the hooks.
        self._nesting = StepNesting()
        # A closure step of torch's own optimizers is checked whole after its closure:
        # they write nothing before calling it, so the weights as the last step left
        # them are still there, and a closure that writes them is caught (red team 3).
        # An optimizer from elsewhere (SAM's step writes its perturbation before it
        # calls the closure) is checked at the step's entry for those, and the closure's
        # own writes then go unseen (docs/watch.md).
        torch_own = type(optimizer).__module__.startswith("torch.")
        pre, post = step_hooks(
            self._before_step,
            self._after_step,
            self._nesting,
            entry=None if torch_own else functools.partial(self._before_step, "entry"),
            rest=None if torch_own else functools.partial(self._before_step, "rest"),
        )
        self._hooks = [
            optimizer.register_step_pre_hook(pre),
            optimizer.register_step_post_hook(post),
        ]
        env = assembly.install_checks(self, own)  # self.checks, in the order alerts come
        self.tamper.watch_loads(model)  # budget mode: a load_state_dict's bits verified
        assembly.plan_phases(self)  # the budget schedule; per phase, the checks that act
        started = [a for check in self.checks for a in check.start(Context(0, self.rank))]
        summary = env.summary if env is not None else None
        start = run_start(self, summary, conditions.gather(model))
        if self.lanes:  # several optimizers: the further ones' own (monitor/optimizers.py)
            start["optimizers"] = start_record(self.optimizers, self.lanes)
        self._record("run-start", start)
        self.sink.raise_all(started)
        # Ranks that hang without dying (docs/watch.md); None when hang_seconds is None.
        self.watchdog = Watchdog.for_guard(self, opts)
        self._closed = False
        self._check_failures: Counter[str] = Counter()  # per check.phase (TG1315)
        # A closure step: the step whose entry part ran, and its context (_before_step).
        self._entered = -1
        self._entry_ctx: Context | None = None
        # Since when the guard's own hooks run (None: they don't): the watchdog counts no
        # stall for a while then, and the clock restarts when they end (a one-time scan in a
        # large process once took longer than a tight hang threshold and was reported as
        # the training's stall).  Bounded in the watchdog: a guard blocked in its own
        # collective behind a dead peer is still a stall.
        self._busy: float | None = None
        # A script that ends without close() still gets its run-end and final signed heads
        # (without them ledger verify fails the run: TG1211/TG1212); a killed process does not.
        atexit.register(_close_at_exit, weakref.ref(self))
        terminate.install(self)  # SIGTERM (preemption) ends the run cleanly too
        # The guard's own structure from here on (monitor/integrity.py: TG1304 if it changes).
        integrity.watch_self(self)

    # -- what other parts of the monitor read ---------------------------------
    @property
    def _after(self) -> Fingerprint:
        """The parameters' fingerprint after the last step (distributed.py compares it)."""
        return self.tamper.after

    @property
    def checked_boundaries(self) -> int:
        return self.tamper.checked_boundaries

    @property
    def sampled_share(self) -> float:
        return self.tamper.sampled_share

    # -- alerts and records --------------------------------------------------
    def _alert(
        self, rule: str, message: str, severity: Severity | None = None, **evidence: Any
    ) -> None:
        ctx = Context(self.step_index, self.rank)
        self.sink.raise_all([ctx.alert(rule, message, severity=severity, **evidence)])

    def _record(self, kind: str, payload: dict[str, Any]) -> None:
        mark = self._waits.begin()  # the store's I/O: a wait by design (a remote database)
        try:
            self.recorder.append(kind, payload, self.step_index)
        finally:
            self._waits.end(mark)

    # -- the optimizer hooks ---------------------------------------------------
    def _before_step(self, part: str = "all") -> None:
        """The pre-step checks.  ``part``: "all" at the pre-hook of a step without a
        closure; with one, "entry" at the pre-hook (the checks of the weights as the last
        step left them, ``Check.at_entry``) and "rest" when the closure first returns
        (the rest, which read this step's gradients)."""
        if part == "rest" and self._entered != self.step_index:
            part = "all"  # no entry part ran for this step
        if part == "rest":
            self._before_rest()
            return
        started, mark = clock.now(), self._off.begin()
        self._busy = clock.now()
        integrity.verify(self, self.step_index, self.rank)
        try:
            if self._pending is not None:  # guard.step was not called for the last step
                self._overhead += clock.now() - started  # the check above: that step's
                self._finish_step(None, None, kind="repeat")
                # The finish counts once, as the next step's _finish_cost (as when
                # guard.step finishes it); counted here too, that step's guard phase held
                # it twice and its compute phase lost it (WGAN with the critic first).
                started, mark = clock.now(), self._off.begin()
            self._step_started = clock.now()
            due = self.tamper.due(self.step_index) or self.budget is not None
            ctx = Context(self.step_index, self.rank, due)
            runs = self._runs = self.schedule.runs(self.step_index) if self.schedule else None
            self._runs_at = self.step_index
            if self.schedule is not None:
                # The next step's draw, now: its backward runs before its step hooks, and
                # a unit comparing two boundaries takes its first one at this step.
                upcoming = self.schedule.runs(self.step_index + 1)
                for check in self._armed:
                    check.arm(check.unit in upcoming)
            self.tamper.sampling = runs is None or "chunks" in runs
            self._entered, self._entry_ctx = (
                (self.step_index, ctx) if part == "entry" else (-1, None)
            )
            for check in self._phase["before_step"]:
                if (part == "all" or check.at_entry) and self._calls(check, runs, True):
                    self._raise(self._hook(check, ctx, before=True))
            if part == "all":
                self._grad_norm = (
                    self.direction.probe.norm_now or total_grad_norm(self.named_params, self.torch)
                    if self.measure_grad_norm
                    else None
                )
        finally:
            self._pre_end = clock.now()
            self._overhead += self._pre_end - started
            self._off.end(mark)
            self._done_busy()

    def _before_rest(self) -> None:
        """A closure step's pre-step checks that read its gradients, once its closure
        has returned (the entry part ran at the pre-hook)."""
        started, mark = clock.now(), self._off.begin()
        self._busy = clock.now()
        try:
            ctx, self._entered = self._entry_ctx, -1
            assert ctx is not None
            for check in self._phase["before_step"]:
                if not check.at_entry and self._calls(check, self._runs, True):
                    self._raise(self._hook(check, ctx, before=True))
            self._grad_norm = (
                total_grad_norm(self.named_params, self.torch) if self.measure_grad_norm else None
            )
        finally:
            self._pre_end = clock.now()
            self._overhead += self._pre_end - started
            self._off.end(mark)
            self._done_busy()

    def _after_step(self) -> None:
        started, mark = clock.now(), self._off.begin()
        self._busy = clock.now()
        self._phases["optimizer"] = started - self._pre_end  # between the step hooks
        try:
            seconds = started - self._step_started
            ctx = Context(self.step_index, self.rank)
            runs = self._runs
            for check in self._phase["after_step"]:
                if self._calls(check, runs, False):
                    self._raise(self._hook(check, ctx, before=False))
            self._pending = {"cosine": self.direction.cosine, "optimizer_step_seconds": seconds}
            self._pending.update(self.tamper.fields)
        finally:
            self._overhead += clock.now() - started
            self._off.end(mark)
            self._done_busy()

    def _spent(self, seconds: float) -> None:
        """A further optimizer's step hooks took ``seconds`` of the guard's time."""
        self._overhead += seconds
        self._done_busy()

    def _done_busy(self) -> None:
        self._busy = None
        if self.watchdog is not None:
            self.watchdog.touch()

    def _calls(self, check: Check, runs: frozenset[str] | None, before: bool) -> bool:
        """Whether ``check`` has anything to do in this step's hook: a scheduled unit left
        out of the step only when it has a ``skipped`` (in place of its pre-step hook).
        Decided without a call: a call per check and phase was the guard's fixed cost."""
        unit = check.unit
        if runs is None or unit is None or unit in runs:
            return True
        return before and id(check) in self._skippers

    def _raise(self, alerts: list[Alert]) -> None:
        if alerts:
            self.sink.raise_all(alerts)

    def _hook(self, check: Check, ctx: Context, *, before: bool) -> list[Alert]:
        """One check's step hook, or, in budget mode, its ``skipped`` when the schedule
        leaves its unit out of this step (a scheduled unit's time is charged to it)."""
        phase = check.before_step if before else check.after_step
        name, when = type(check).__name__, "before_step" if before else "after_step"
        runs, unit = self._runs, check.unit
        if runs is None or unit is None or self.schedule is None:
            return checked(name, when, ctx, lambda: phase(ctx), self._check_failures)
        if unit not in runs:
            if not before or not assembly.acts(check, "skipped"):
                return []  # a call per check and step is the guard's fixed cost
            return checked(name, "skipped", ctx, lambda: check.skipped(ctx), self._check_failures)
        started = clock.now()
        try:
            return checked(name, when, ctx, lambda: phase(ctx), self._check_failures)
        finally:
            outside = check.outside_seconds() if before else 0.0
            self.schedule.charge(unit, clock.now() - started + outside)

    # -- the user's call ----------------------------------------------------------------
    def step(
        self,
        loss: Any = None,
        batch: Any = None,
        grad_norm: Any = None,
        *,
        lr: float | list[float] | None = None,
        reseed: bool = False,
        hyper: Mapping[str, Any] | None = None,
        changed: Any = None,
    ) -> None:
        """Call right after ``optimizer.step()``: records the step and runs its checks.

        ``grad_norm``: the total gradient norm your loop already has (what
        ``clip_grad_norm_`` returned); with ``watch(..., measure_grad_norm=False)``
        the guard then skips computing it.  ``lr``: the learning rate the loop set
        itself for this step (one, or one per param group): only undeclared changes
        alert.  ``reseed``: the loop re-seeded a random generator on purpose this step.
        ``hyper``: other settings the loop wrote into the param groups itself this step,
        ``{"weight_decay": wd}``: a value for every group, or a list with one per group.
        ``changed``: module settings, buffers or data loader objects the loop changed on
        purpose this step, by name (``["drop.p"]``) or with the value set
        (``{"drop.p": 0.0}``); only undeclared changes alert.
        """
        # A name no check knows is a typo the loop would never hear of: refused.
        declarable.check(changed, self.model, self.options.loss_fn, self.dataloader)
        # Several optimizers: lr= and hyper= list every optimizer's groups, in order.
        declared, hyper = self.optimizers.declare(lr, hyper)
        self._declared = StepEnd(None, None, 0.0, [], declared, reseed, declared_changes=changed)
        if grad_norm is not None:
            self._grad_norm = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
        self._nesting.reset()
        integrity.verify(self, self.step_index, self.rank)
        self.hyper.declare(hyper)
        if self._pending is None:
            self._unhooked()
        self._finish_step(loss, batch)
        stopped = self.sink.take_stopped()
        if stopped:
            raise TrainingStopped(stopped)

    def outside_step(self, reason: str = "declared") -> AbstractContextManager[None]:
        """``with guard.outside_step("sam"):`` around code that writes the weights on
        purpose between two steps (SAM, Lookahead): recorded, not alerted as tampering
        (monitor/declare.py)."""
        return _outside_step(self, reason)

    def profiling(self) -> AbstractContextManager[None]:
        """``with guard.profiling():`` around steps run under a profiler or debugger
        started inside it: a verified tool's trace or profile function is then recorded
        (TG1316), anything else is still TG1304 (monitor/checks/tracing.py)."""
        return _profiling(self)

    def _unhooked(self) -> None:
        """No step hooks since the last ``guard.step``: a skipped step (AMP overflow), or
        an update that went around them.  Weights change only inside them: check here."""
        ctx = Context(self.step_index, self.rank)
        self.sink.raise_all(self.identity.before_step(ctx) + self.tamper.before_step(ctx))
        self.sink.raise_all(self.tamper.after_step(ctx))
        self._pending = dict(self.tamper.fields, hooks=False)

    def _finish_step(self, loss: Any, batch: Any, kind: str = "") -> None:
        """``kind``: "repeat" when the first optimizer's next step ends this one (StepEnd)."""
        started, self._finish_mark = clock.now(), self._off.begin()
        self._busy = clock.now()
        try:
            self._finish_step_record(loss, batch, kind)
        finally:
            # The guard's own time in this step: what budget mode holds to its share.
            self._finish_cost = clock.now() - started  # counts in the next step's time
            self._off.end(self._finish_mark)  # from the step's end on: the next step's
            self.last_step_overhead, self._overhead = self._overhead + self._finish_cost, 0.0
            if self.schedule is not None:
                times = self.windows["time"]
                median = times.median() if times.ready() else None
                self.schedule.update(self.last_step_overhead, median, spans=("chunks",))
            self._done_busy()

    def _finish_step_record(self, loss: Any, batch: Any, kind: str) -> None:
        now = clock.now()
        step_time, self._last_step_end = now - self._last_step_end, now
        tensors = tensors_in(batch, self.torch)
        said, self._declared = self._declared, None
        declared = (said.declared_lr, said.declared_reseed) if said is not None else (None, False)
        guard = self._overhead + self._finish_cost
        phases = {"optimizer": self._phases.pop("optimizer", 0.0), "guard": guard}
        phases["compute"] = max(0.0, step_time - phases["optimizer"] - guard)
        changes = said.declared_changes if said is not None else None
        fields = (scalar(loss), self._grad_norm, step_time, tensors, *declared, phases)
        # Blocked time up to here, where the step-time check's clocks end this step too.
        self._off.end(self._finish_mark)
        blocked, self._finish_mark = self._off.take() - self._waits.take(), self._off.begin()
        end = StepEnd(*fields, changes, kind, guard_blocked=max(0.0, blocked))
        ctx = Context(self.step_index, self.rank)
        for check in self._phase["step_end"]:
            name = type(check).__name__
            self._raise(
                checked(
                    name,
                    "step_end",
                    ctx,
                    functools.partial(check.step_end, ctx, end),
                    self._check_failures,
                )
            )
        batch_fp = self._batch_fingerprint(tensors)
        payload = step_payload(self, end, batch_fp)
        if self.lanes:
            payload["optimizers"] = step_record(self.lanes)
        if self.samples is not None:
            payload["samples"] = self.samples.record(tensors)
        self._record("step", payload)
        # Once its record is written the step happened: an interrupt from here on (Ctrl-C
        # while the head is signed or the ranks compared) must not leave the guard at this
        # step, or a checkpoint saved in the handler names the step before the weights it
        # holds and the run-end counts one step fewer than the records.
        try:
            self.seeds.after_record()
            self._pending = None
            self.recorder.step_done(self.step_index)
            if self._sync_due():
                from trainguard.monitor.distributed import compare_ranks

                mark = self._waits.begin()  # waits for the slowest peer by design
                try:
                    compare_ranks(self)
                finally:
                    self._waits.end(mark)
        finally:
            self._pending = None
            self.step_index += 1

    def _batch_fingerprint(self, tensors: list[Any]) -> Fingerprint | None:
        """The batch's fingerprint; in budget mode at the steps the schedule draws for
        ``batch`` (a step whose hooks did not run: always), else None (replay then skips
        the batch at that step, as it does for a step without one)."""
        if not tensors:
            return None
        if self.schedule is None or self._runs is None or self._runs_at != self.step_index:
            return self.fp.fingerprint((str(i), t) for i, t in enumerate(tensors))
        if "batch" not in self._runs:
            return None
        started = clock.now()
        try:
            return self.fp.fingerprint((str(i), t) for i, t in enumerate(tensors))
        finally:
            self.schedule.charge("batch", clock.now() - started)

    def _sync_due(self) -> bool:
        every = self.options.sync_every
        return self.world_size > 1 and bool(every) and (self.step_index + 1) % every == 0

    def checkpoint(self, path: str | os.PathLike[str], *, data_state: Any = None) -> dict[str, Any]:
        """Save what ``trainguard replay`` needs to re-run from here (after ``guard.step``).

        ``data_state``: plain data you want back at replay time (the epoch...).  Returns
        the ``checkpoint`` record's payload; see monitor/checkpoint.py and docs/replay.md.
        """
        from trainguard.monitor.checkpoint import save

        if self.watchdog is None:
            return save(self, path, data_state=data_state)
        with self.watchdog.paused():  # a long save is not a hang
            return save(self, path, data_state=data_state)

    def close(self, error: BaseException | None = None, *, reason: str | None = None) -> None:
        """Flush the last step, remove hooks; write a run-end record (``error``: what ended
        training, if anything: then stopped peers are reported; ``reason``: "terminated"
        from the SIGTERM handler).  Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._pending is not None:
            self._finish_step(None, None)
        if self.world_size > 1 and self.ledger is not None:
            from trainguard.monitor.distributed import check_ranks

            check_ranks(self, failed=error is not None)
        for h in self._hooks:
            h.remove()
        for check in self.checks:
            check.close()
        self.sink.flush()
        self._record(
            "run-end",
            {
                "steps": self.step_index,
                "alerts": len(self.alerts),
                "error": repr(error)[:500] if error is not None else None,
                **({"reason": reason} if reason is not None else {}),
            },
        )
        self.recorder.finish(self.step_index, self.world_size)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)


def _close_at_exit(ref: weakref.ReferenceType[Guard]) -> None:
    """Close a guard the script left open when the interpreter exits."""
    guard = ref()
    if guard is None or guard._closed:
        return
    try:
        guard.close()
    except Exception:  # at exit, a failed close is a warning, never a traceback storm
        logging.getLogger("trainguard.monitor").warning(
            "trainguard: closing run %s at exit failed", guard.run_id, exc_info=True
        )


def watch(model: Any, optimizer: Any, options: WatchOptions | None = None, **kwargs: Any) -> Guard:
    """Start watching a training run; see :class:`WatchOptions` for the options."""
    return Guard(model, optimizer, options, **kwargs)
