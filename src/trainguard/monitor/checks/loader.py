"""An object on the data loader's path replaced mid-run (TG1319).

The guard's data checks hold the objects they found at start-up: the
sampler, its generator, the batch sampler.  The loader does not read them
through the guard: it reads ``dl.batch_sampler`` and then that object's
``sampler``, so ``dl.batch_sampler.sampler = sorted_indices`` (which
DataLoader allows, unlike ``dl.sampler = ...``) or ``dl.sampler.generator =
a fixed-seed generator`` each epoch changes the data order while every
watched object stays as it was.  The invariant: at each step the object
installed at each path is the object installed there at start-up.  The paths
are resolved again from the loader at every step (a few attribute reads:
microseconds), and compared by identity.

A state change of the same object (``set_epoch``, a generator that advances
or is re-seeded) is not a swap (other checks judge those); a swap the loop
makes on purpose is declared, ``guard.step(changed=["dataloader.sampler"])``,
and the object installed there becomes the baseline.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.forwards import Change, Held, declared_names

PATHS = (
    "dataset",
    "sampler",
    "sampler.generator",
    "batch_sampler",
    "batch_sampler.sampler",
    "batch_sampler.sampler.generator",
    "batch_sampler.batch_size",
    "batch_sampler.drop_last",
    "generator",
    "collate_fn",
    "worker_init_fn",
    "dataset.tensors",  # TensorDataset: the tuple of tensors it indexes
)
_ABSENT = object()


class LoaderPathCheck(Check):
    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader
        self.held = Held()
        self.baseline = self._resolve()

    def _resolve(self) -> dict[str, Any]:
        out = {}
        for path in PATHS:
            obj: Any = self.dataloader
            for part in path.split("."):
                obj = getattr(obj, part, _ABSENT) if obj is not _ABSENT else _ABSENT
            out[path] = obj
        return out

    def before_step(self, ctx: Context) -> list[Alert]:
        now = self._resolve()
        for path, obj in now.items():
            old = self.baseline[path]
            if obj is old or _equal_plain(obj, old):
                continue
            name = f"dataloader.{path}"
            alert = ctx.alert(
                "TG1319",
                f"{name} is no longer the object installed at start-up: "
                f"{_kind(old)} -> {_kind(obj)}",
                path=name,
                key=name,  # one aggregation group per path (monitor/sink.py)
                old=_kind(old),
                new=_kind(obj),
            )
            self.held.add(Change(name, obj, alert, by_value=False))
            self.baseline[path] = obj  # reported once
        return []

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        declared = declared_names(end.declared_changes)
        if declared:
            # An object declared at one path is declared wherever it is installed:
            # dl.sampler is dl.batch_sampler.sampler, so their generators are one too.
            now = self._resolve()
            objects = [
                now[n.removeprefix("dataloader.")]
                for n in declared
                if n.removeprefix("dataloader.") in now
            ]
            for path, obj in now.items():
                name = f"dataloader.{path}"
                # Also what hangs off a declared object (a new dataset's tensors).
                under = any(name.startswith(f"{n}.") for n in list(declared))
                if under or any(obj is o for o in objects):
                    declared.setdefault(name, obj)
        return self.held.release(ctx, declared)


def _equal_plain(a: Any, b: Any) -> bool:
    """Plain settings (a batch size, a flag) compare by value: the same number is no swap."""
    plain = (int, float, bool, str, type(None))
    return isinstance(a, plain) and isinstance(b, plain) and type(a) is type(b) and a == b


def _kind(obj: Any) -> str:
    if obj is _ABSENT:
        return "<absent>"
    return f"{type(obj).__module__}.{type(obj).__qualname__} at {id(obj):#x}"
