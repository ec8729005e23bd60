"""The model's parameters must stay the tensors the optimizer updates (TG1301).

A parameter object replaced in the model (``layer.weight = nn.Parameter(...)``)
leaves the optimizer updating an orphan: the layer is silently frozen, and the
fingerprints of the orphan look perfect.  So at each check the model's
parameters must be the very objects they were at start-up, those the optimizer
held must still be in its param groups, and no parameter may stop requiring
gradients.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check


class ParameterIdentityCheck(Check):
    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = dict(model.named_parameters())
        self.trained = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads = {n: p.requires_grad for n, p in self.params.items()}

    def before_step(self, ctx: Context) -> list[Alert]:
        if not ctx.due:
            return []
        now = dict(self.model.named_parameters())
        replaced = sorted(
            n for n in set(now) | set(self.params) if now.get(n) is not self.params.get(n)
        )
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        swapped = len(held) != len(self.trained) or any(
            a is not b for a, b in zip(held, self.trained, strict=False)
        )
        frozen = sorted(
            n for n, p in now.items() if n in self.grads and p.requires_grad != self.grads[n]
        )
        alerts = []
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
        if frozen:
            alerts.append(
                ctx.alert(
                    "TG1301",
                    f"requires_grad changed on {', '.join(frozen[:5])}",
                    tensors=frozen[:50],
                    via="requires_grad",
                )
            )
        self.params, self.trained = now, held
        self.grads = {n: p.requires_grad for n, p in now.items()}
        return alerts
