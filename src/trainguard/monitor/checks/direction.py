"""The update contradicts the gradient (TG1306); see monitor/direction.py."""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.direction import DirectionCheck
from trainguard.monitor.gradtransform import DEFAULT_RULES, GradRules
from trainguard.monitor.hookchain import ChainWitness


class UpdateDirectionCheck(Check):
    unit = "direction"

    def __init__(
        self,
        params: list[tuple[str, Any]],
        optimizer: Any,
        key: bytes,
        rules: GradRules = DEFAULT_RULES,
        *,
        norm_rule: bool = True,
    ) -> None:
        self.optimizer = optimizer
        # norm_rule: this optimizer's parameters are all a clip_grad_norm_ call saw (one
        # optimizer on the model), so a clipped step leaves their total at max_norm.
        self.probe = DirectionCheck(params, key, rules, norm_rule=norm_rule)
        # Gradient hooks found at start-up: verified read-only (monitor/hookchain.py).
        self.chain = ChainWitness(self.probe.params, self.probe.index, self._armed)
        self.cosine: float | None = None
        self._names = {id(p): n for n, p in params}  # every parameter, frozen ones too
        self._groups = len(optimizer.param_groups)
        self._disarm = False  # budget mode: disarm once this step's gradients are judged

    def before_step(self, ctx: Context) -> list[Alert]:
        groups = self.optimizer.param_groups
        if len(groups) > self._groups:  # add_param_group (gradual unfreezing): probe them too
            added = [p for g in groups[self._groups :] for p in g["params"]]
            named = [(self._names[id(p)], p) for p in added if id(p) in self._names]
            self.probe.adopt(named, hook=False)
        self._groups = len(groups)
        flipped = self.probe.before_step()
        self._apply_arm()
        broken = self.probe.broken  # monitor/gradfactor.py
        alerts = self._accumulation(ctx) + self._chain(ctx)
        if flipped:  # the more specific name of the same finding: one alert, both said
            said: dict[str, Any] = {"factor": broken} if broken is not None else {}
            return [
                *alerts,
                ctx.alert(
                    "TG1306",
                    f"gradients of {len(flipped)} tensor(s) changed sign between "
                    f"backward and optimizer.step (clipping only shrinks them): "
                    f"{', '.join(flipped[:5])}",
                    tensors=flipped[:50],
                    **said,
                ),
            ]
        if broken is not None:
            alerts.append(ctx.alert("TG1306", f"between backward and optimizer.step: {broken}"))
        return alerts

    def _accumulation(self, ctx: Context) -> list[Alert]:
        """The step's backward passes did not add up (monitor/accumulation.py)."""
        found = self.probe.accumulation
        if found is None:
            return []
        return [ctx.alert("TG1306", f"gradient accumulation: {found}")]

    def skipped(self, ctx: Context) -> list[Alert]:
        self.cosine = None
        self.probe.skip()
        self._apply_arm()
        if self.probe.armed:  # the next step is probed: what its first backward may find
            self.probe.keep_reference()
        return []

    def outside_block(self, inside: bool) -> None:
        """``guard.outside_step()``: a backward inside it (an adversarial example's) is
        not the step's; the block's ends are step boundaries for the accumulation."""
        self.probe.passes.boundary()

    def arm(self, on: bool) -> None:
        # Disarmed only once this step's gradients are judged: the guard arms the next
        # step at a closure step's entry, and the closure's backward (SAM's second pass,
        # LBFGS) must still be sampled, or the step compares another backward's samples.
        if on:
            self.probe.armed = True
        self._disarm = not on

    def _apply_arm(self) -> None:
        if self._disarm:
            self.probe.armed = False
            self._disarm = False

    def _armed(self) -> bool:
        return self.probe.armed

    def _chain(self, ctx: Context) -> list[Alert]:
        changed = self.chain.take()
        if not changed:
            return []
        return [
            ctx.alert(
                "TG1306",
                f"a gradient hook installed before watch() changed the gradient autograd "
                f"computed (read-only hooks leave it as it was): {', '.join(changed[:5])}",
                tensors=changed[:50],
            )
        ]

    def outside_seconds(self) -> float:
        spent, self.probe.outside = self.probe.outside, 0.0
        spent, self.chain.outside = spent + self.chain.outside, 0.0
        return spent

    def after_step(self, ctx: Context) -> list[Alert]:
        self.probe.passes.boundary()
        self.cosine = cosine = self.probe.after_step(self.optimizer)
        if self.probe.mismatch is not None:  # the step's math (monitor/direction.py)
            return [ctx.alert("TG1306", self.probe.mismatch, cosine=cosine)]
        if cosine is None or cosine >= 0:
            return []
        return [
            ctx.alert(
                "TG1306",
                f"the update points against the direction "
                f"{type(self.optimizer).__name__} prescribes (cosine {cosine:.3f})",
                cosine=cosine,
            )
        ]

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        self.probe.passes.boundary()  # guard.step: a step GradScaler skipped ends here too
        fresh = self.probe.unchecked.fresh()
        if not fresh:
            return []
        listed = ", ".join(f"{n} ({why})" for n, why in list(fresh.items())[:5])
        return [
            ctx.alert(
                "TG1315",
                f"the gradient probe cannot read {len(fresh)} tensor(s) and skips them: {listed}",
                tensors=sorted(fresh)[:50],
                reasons=dict(list(fresh.items())[:50]),
            )
        ]

    def close(self) -> None:
        self.probe.remove()
        self.chain.remove()
