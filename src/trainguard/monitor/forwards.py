"""When the model's forward runs, and what a training loop declared it changed.

Modules change some of their own state inside ``forward``: BatchNorm's running
statistics, a rotary table's cache, an EMA codebook.  Nothing else may change
it between steps.  To tell the two apart without a list of module types, the
guard needs to know when a forward starts and ends: :class:`ForwardWatch`
puts one pre-hook and one post-hook on the model's root module (trainguard's
own code, in the model's hook registry, which the identity check then
watches like any other) and calls its listeners there.

The hooks are kept out of ``torch.compile``'s graphs: they read Python state,
which a traced graph would freeze.

:class:`Held` is what the checks of this family share for declarations: a
change found before ``guard.step`` is held until it is called, and dropped
(recorded as TG1316, low) when the loop declared it with
``guard.step(changed=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context

Listener = Callable[[bool], None]  # called with whether gradients are enabled


class ForwardWatch:
    """Root-module forward hooks that call listeners at each forward's start and end."""

    def __init__(self, model: Any) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.starts: list[Listener] = []
        self.ends: list[Callable[[], None]] = []
        self.depth = 0  # > 0 while a forward of the root module runs (re-entrant models)
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        pre, post = self._pre, self._post
        if disable is not None:  # not traced into a compiled graph
            pre, post = disable(pre), disable(post)
        self._handles = [
            model.register_forward_pre_hook(pre),
            model.register_forward_hook(post, always_call=True),
        ]

    def _pre(self, module: Any, args: Any) -> None:
        self.depth += 1
        if self.depth == 1:
            grad = bool(self.torch.is_grad_enabled())
            for listener in self.starts:
                listener(grad)

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            for listener in self.ends:
                listener()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def declared_names(changed: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``guard.step(changed=...)`` as a mapping from a name to its declared value
    (``DECLARED_ANY`` when the loop gave only the name)."""
    if changed is None:
        return {}
    if isinstance(changed, str):
        return {changed: DECLARED_ANY}
    if isinstance(changed, Mapping):
        return dict(changed)
    return {str(name): DECLARED_ANY for name in changed}


class _Any:
    def __repr__(self) -> str:
        return "<any value>"


DECLARED_ANY: Any = _Any()


@dataclass
class Change:
    """One change a check found: the name a declaration uses, its new value, the alert."""

    name: str
    value: Any
    alert: Alert
    by_value: bool = True  # a declared value must equal ``value`` (settings); else any


class Held:
    """Changes awaiting ``guard.step``: declared ones become TG1316 (low), the rest alert."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def add(self, change: Change) -> None:
        self.changes.append(change)

    def release(self, ctx: Context, declared: Mapping[str, Any]) -> list[Alert]:
        out: list[Alert] = []
        changes, self.changes = self.changes, []
        said: list[str] = []
        for c in changes:
            if c.name in declared and _matches(declared[c.name], c.value, c.by_value):
                said.append(c.name)
                continue
            out.append(c.alert)
        if said:
            out.append(
                ctx.alert(
                    "TG1316",
                    f"declared with guard.step(changed=...): {', '.join(sorted(set(said))[:8])}",
                    severity=Severity.LOW,
                    declared=sorted(set(said))[:50],
                )
            )
        return out


def _matches(declared: Any, value: Any, by_value: bool) -> bool:
    if declared is DECLARED_ANY or not by_value:
        return True
    if declared is value:
        return True
    try:
        return bool(declared == value)
    except Exception:  # a value whose == raises is not the declared one
        return False
