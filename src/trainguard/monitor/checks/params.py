"""The model's parameters must stay the tensors the optimizer updates (TG1301).

A parameter object replaced in the model (``layer.weight = nn.Parameter(...)``)
leaves the optimizer updating an orphan: the layer is silently frozen, and the
fingerprints of the orphan look perfect.  So at each check the model's
parameters must be the very objects they were at start-up, those the optimizer
held must still be in its param groups, and no parameter may stop requiring
gradients.

Gradual unfreezing is visible and honest: parameters of the model, new to the
optimizer, appended in a new param group (``optimizer.add_param_group``), are
recorded (TG1316) and watched from then on; anything else the groups hold
instead is TG1301.  A frozen parameter the optimizer already holds that starts
requiring gradients trains at once: like a freeze, it is declared (red team s5 A5).
A parameter frozen or unfrozen mid-run on purpose is declared at that step's
``guard.step(changed=["<name>.requires_grad"])`` (or ``["requires_grad"]`` for all):
recorded, and a frozen one held to stay untouched from then on (monitor/frozen.py).  In budget
mode the check is the schedule's unit ``params``; a declaration made at a step it left
out counts when it runs.
"""

from __future__ import annotations

import operator
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.forwards import declared_names
from trainguard.monitor.frozen import Frozen, declared


class ParameterIdentityCheck(Check):
    core = True  # its failure leaves the step unverified: high at once (safety.py)
    # Budget mode: at the steps the schedule draws.  Each run compares with what the last
    # one saw, so a change made at a skipped step is found at the next run.
    unit = "params"

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = dict(model.named_parameters())
        self.trained = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads = {n: p.requires_grad for n, p in self.params.items()}
        self._tree = _tree(model)
        self.frozen = Frozen()  # frozen on purpose (declared): held untouched
        self._all, self._said = False, set[str]()  # declared at steps since the last run
        self._pending: tuple[int, list[str]] | None = None  # frozen, awaiting guard.step

    def _unchanged(self) -> bool:
        """The common case without walking ``named_parameters()`` (a generator per module
        and a string per name, every step): the module tree holds the same submodules
        and parameter slots as at the last check, the param groups the same tensors, and
        no parameter's ``requires_grad`` moved.  Then the full comparison finds nothing."""
        if self._tree is None:
            return False
        for m, params, modules in self._tree:
            mp, mm = m._parameters, m._modules
            if len(mp) != len(params) or len(mm) != len(modules):
                return False
            for k, v in params:
                if mp.get(k) is not v:
                    return False
            for k, v in modules:
                if mm.get(k) is not v:
                    return False
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(held) != len(self.trained) or not all(map(operator.is_, held, self.trained)):
            return False
        return all(p.requires_grad == self.grads[n] for n, p in self.params.items())

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        # Unfrozen since the last run (budget mode: maybe steps ago, trained since): no
        # longer held untouched; the unfreeze is judged below like a freeze (declared:
        # TG1316 low, else TG1301).  A write made while it was still frozen and before
        # the unfreeze is then seen only if a run came between (exact mode: always).
        self.frozen.release(self.frozen.thawed())
        alerts = self._overdue(ctx) + self._frozen_moved(ctx)
        # Declarations made since the last run (a freeze after optimizer.step, declared at
        # that guard.step; in budget mode, at steps the schedule left out): used once.
        everything, names = self._all, self._said
        self._all, self._said = False, set()
        if self._unchanged():
            return alerts
        self._tree = _tree(self.model)
        now = dict(self.model.named_parameters())
        replaced = sorted(
            n for n in set(now) | set(self.params) if now.get(n) is not self.params.get(n)
        )
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        kept = len(held) >= len(self.trained) and all(
            a is b for a, b in zip(held, self.trained, strict=False)
        )
        ids = {id(p): n for n, p in now.items()}
        extra = held[len(self.trained) :] if kept else []
        # Appended, all the model's own, none held before (add_param_group checks that).
        added = sorted(ids[id(p)] for p in extra if id(p) in ids)
        swapped = not kept or len(added) != len(extra)
        holds = {id(p) for p in held}
        turned = [n for n, p in now.items() if n in self.grads and p.requires_grad != self.grads[n]]
        # Unfrozen into training: now requiring gradients and held by the optimizer.
        unfrozen = sorted(n for n in turned if now[n].requires_grad and id(now[n]) in holds)
        frozen = sorted(n for n in turned if n not in unfrozen)
        self.frozen.release(unfrozen)
        # A parameter the optimizer already held that starts requiring gradients trains a
        # layer the run froze (red team s5 A5, from a planted Dataset): declared like a
        # freeze.  One new to the optimizer (add_param_group) is visible as such.
        if added and not swapped:
            alerts.append(
                ctx.alert(
                    "TG1316",
                    f"training widened: {len(added)} parameter(s) added in a new param group"
                    f": {', '.join(added[:5])}",
                    tensors=added[:50],
                    via="add_param_group",
                )
            )
        frozen = sorted(frozen + [n for n in unfrozen if n not in added])
        if replaced:
            alerts.append(
                ctx.alert(
                    "TG1301",
                    f"{len(replaced)} parameter(s) of the model are no longer the tensors the "
                    f"optimizer updates: {', '.join(replaced[:5])}",
                    tensors=replaced[:50],
                    via="identity",
                )
            )
        if swapped:
            alerts.append(
                ctx.alert(
                    "TG1301",
                    "the optimizer's param groups hold other tensors than at start-up",
                    via="identity",
                )
            )
        if frozen:  # judged at guard.step, where the loop declares a freeze
            alerts += self._judge_frozen(ctx, frozen, everything, names)
        self.params, self.trained = now, held
        self.grads = {n: p.requires_grad for n, p in now.items()}
        return alerts

    def _judge_frozen(
        self, ctx: Context, frozen: list[str], everything: bool, names: set[str]
    ) -> list[Alert]:
        """Declared freezes (and unfreezes) are recorded, freezes held; the rest wait for
        this step's guard.step."""
        said = [n for n in frozen if everything or n in names]
        left = [n for n in frozen if n not in said]
        now = dict(self.model.named_parameters())
        for n in said:
            p = self.params.get(n, now.get(n))
            if p is not None and not p.requires_grad:
                self.frozen.hold(n, p)
        if left:
            self._pending = (ctx.step, left)
        if not said:
            return []
        return [
            ctx.alert(
                "TG1316",
                "frozen or unfrozen as declared with guard.step(changed=...): "
                f"{', '.join(said[:5])}",
                severity=Severity.LOW,
                tensors=said[:50],
                via="requires_grad",
            )
        ]

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        everything, names = declared(declared_names(end.declared_changes))
        pending, self._pending = self._pending, None
        if pending is None:
            self._all, self._said = self._all or everything, self._said | names
            return []
        alerts = self._judge_frozen(ctx, pending[1], everything, names)
        pending, self._pending = self._pending, None
        return alerts + (_requires_grad(ctx, pending[1]) if pending is not None else [])

    def _overdue(self, ctx: Context) -> list[Alert]:
        """Frozen at an earlier step whose guard.step never came to judge it: no
        declaration can come now (fail closed)."""
        pending = self._pending
        if pending is None or pending[0] >= ctx.step:
            return []
        self._pending = None
        return _requires_grad(ctx, pending[1])

    def _frozen_moved(self, ctx: Context) -> list[Alert]:
        moved = self.frozen.moved() if self.frozen.held else []
        if not moved:
            return []
        return [
            ctx.alert(
                "TG1301",
                f"{len(moved)} parameter(s) declared frozen were written since: "
                f"{', '.join(moved[:5])} (a frozen parameter whose gradient is zero, not "
                f"None, still moves under momentum or weight decay)",
                tensors=moved[:50],
                via="requires_grad",
            )
        ]


def _requires_grad(ctx: Context, frozen: list[str]) -> list[Alert]:
    return [
        ctx.alert(
            "TG1301",
            f"requires_grad changed on {', '.join(frozen[:5])}",
            tensors=frozen[:50],
            via="requires_grad",
        )
    ]


Tree = list[tuple[Any, tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]]


def _tree(model: Any) -> Tree | None:
    """Each module's parameter and submodule slots, when ``named_parameters()`` is
    torch's own walk over them (None otherwise: a model object of another kind, or a
    module class with its own ``named_modules``/``named_parameters``: always the full
    comparison)."""
    try:
        import torch

        base = torch.nn.Module
        if not isinstance(model, base) or type(model).named_parameters is not (
            base.named_parameters
        ):
            return None
        modules = list(model.modules())
        if any(type(m).named_modules is not base.named_modules for m in modules):
            return None
        return [(m, tuple(m._parameters.items()), tuple(m._modules.items())) for m in modules]
    except Exception:  # an odd model: the full comparison, as before
        return None
