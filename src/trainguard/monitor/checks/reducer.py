"""DistributedDataParallel's reducer changed mid-run (TG1304).

A DDP module's reducer decides what every rank's ``.grad`` holds after backward:
``ddp.register_comm_hook(state, hook)`` hands each gradient bucket to a callable
whose result is written into the gradients on every rank (one that keeps 10% of
each bucket, negates it, or returns the local gradient without averaging, all
look like honest training to the weight and update checks: the optimizer does
apply the gradient it was given).  torch accepts a first hook at any iteration.
So the reducer's state is part of the training machinery: its comm hooks (the
python list ``_comm_hooks`` and the name the reducer's logger keeps for a
built-in hook), the reducer and process group objects, and the settings that
decide how gradients are bucketed and averaged (bucket size, gradient as bucket
view, static graph, unused parameters, buffer broadcast, mixed precision,
delayed all-reduce).  They are read at start-up and compared at both step hooks
of every step (a few attribute reads and the logger's dict: microseconds), so a
change is named at the step it happened, in budget mode too.

At start-up, a comm hook whose code lies outside torch (torch's own
``default_hooks`` and built-in hooks are not reported) is TG1304 high, as other
gradient hooks installed before ``watch()`` are.

Not seen here: a hook registered on the C++ reducer directly
(``dist._register_comm_hook(ddp.reducer, ...)``) leaves no trace on the Python
side; DDP modules outside the model given to ``watch()`` (watch the wrapper).
"""

from __future__ import annotations

import os
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import identity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check

# DDP attributes that decide how gradients are bucketed, averaged and written back (not
# the sync flags: no_sync() flips them, and settings.py judges what they did: TG1318).
SETTINGS = (
    "reducer",
    "process_group",
    "logger",
    "gradient_as_bucket_view",
    "static_graph",
    "find_unused_parameters",
    "bucket_bytes_cap",
    "broadcast_buffers",
    "mixed_precision",
    "parameters_to_ignore",
    "skip_all_reduce_unused_params",
    "_delay_all_reduce_all_params",
    "_use_python_reducer",
)
# The reducer's own view (its logger): a built-in hook and settings set on the reducer.
LOGGED = (
    "comm_hook",
    "bucket_cap_bytes",
    "find_unused_parameters",
    "gradient_as_bucket_view",
    "static_graph",
    "broadcast_buffers",
    "world_size",
)
_ABSENT = object()


def _ddp_modules(model: Any) -> list[tuple[str, Any]]:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # torch without distributed
        return []
    return [
        (n or "root", m) for n, m in model.named_modules() if isinstance(m, DistributedDataParallel)
    ]


def _state(m: Any) -> dict[str, Any]:
    """What decides this DDP module's averaged gradients, by name."""
    out: dict[str, Any] = {k: getattr(m, k, _ABSENT) for k in SETTINGS}
    out["comm hooks"] = tuple(
        [
            o
            for hook, state in list(getattr(m, "_comm_hooks", ()))
            for o in (*identity.layers(hook), state)
        ]
    )
    try:
        logged = m._get_ddp_logging_data()
    except Exception:  # an older torch, or a reducer not built: only the attributes
        logged = {}
    out.update({f"reducer {k}": logged.get(k, _ABSENT) for k in LOGGED})
    return out


def _differs(a: Any, b: Any) -> bool:
    if a is b:
        return False
    try:
        return bool(a != b)
    except Exception:  # an object whose == raises is not the one we saw
        return True


class ReducerCheck(Check):
    """The state of each DistributedDataParallel module in the model, as at start-up."""

    def __init__(self, model: Any) -> None:
        self.modules = _ddp_modules(model)
        self.baseline = [_state(m) for _, m in self.modules]

    def start(self, ctx: Context) -> list[Alert]:
        import torch

        torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        alerts = []
        for name, m in self.modules:
            hooks = [h for h, _ in list(getattr(m, "_comm_hooks", ()))]
            foreign = sorted(
                {
                    identity.origin(f)
                    for h in hooks
                    for f in identity.functions(h)
                    if not identity.origin(f).startswith(torch_dir)
                }
                | {"<builtin>" for h in hooks if not identity.functions(h)}
            )
            if foreign:
                alerts.append(
                    ctx.alert(
                        "TG1304",
                        f"installed before watch() started: DistributedDataParallel {name} "
                        f"comm hook(s) from {', '.join(foreign[:3])}: they decide every "
                        "rank's averaged gradient",
                        severity=Severity.HIGH,
                        functions=[f"{name} comm hook"],
                        at_start=True,
                    )
                )
        return alerts

    def _compare(self, ctx: Context) -> list[Alert]:
        alerts = []
        for (name, m), base in zip(self.modules, self.baseline, strict=True):
            now = _state(m)
            changed = [k for k, v in now.items() if _differs(v, base.get(k, _ABSENT))]
            if not changed:
                continue
            base.update(now)  # each change is named once
            alerts.append(
                ctx.alert(
                    "TG1304",
                    f"DistributedDataParallel {name} reducer changed at run time: "
                    f"{', '.join(changed[:6])} (a comm hook or reducer setting decides every "
                    "rank's averaged gradient)",
                    severity=Severity.HIGH,
                    functions=[f"{name} {k}" for k in changed[:20]],
                )
            )
        return alerts

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._compare(ctx) if self.modules else []

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._compare(ctx) if self.modules else []
