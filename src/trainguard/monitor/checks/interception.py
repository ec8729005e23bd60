"""Interception below Python names (TG1304); see monitor/interception.py for the state.

Three parts, each with its cost:

* at both step hooks, the mode stacks, infra modes, saved-tensor default hooks and the
  Python dispatcher switch against their start-up value, and the size of
  ``torch.library._impls`` (a new Python kernel is named at the step it appears, and
  the dispatcher's table of the operators it names is re-read then): a few
  microseconds;
* gradients through the parameters' ``AccumulateGrad`` nodes: a tensor hook on each
  parameter sees the gradient before the node's own pre-hooks run (autograd calls
  tensor pre-hooks first), and the post-accumulate hook sees ``p.grad`` after: at a
  keyed sample of elements, ``p.grad`` must be the old gradient plus the incoming one
  (bit for bit: the same addition).  A hook put on the node itself (red team #6;
  torch has no getter for a node's hooks) that changes the gradient breaks that at the
  step it acts.  Per parameter and backward: two gathers of ``SAMPLE`` elements;
* in budget mode the first two parts are one unit (``interception``): the node hooks do
  their gathers only in the backward of a step the schedule drew (armed right after the
  step before's hooks; one attribute read otherwise), and the state is compared at that
  step's hooks.  A mode, hook or kernel left in place is still named, at the next drawn
  step; one entered and left between two drawn steps is not;
* the dispatcher's table of every operator, digested at start (about 15 µs an
  operator, some 3,600 operators) and re-read in keyed slices: all of it every
  ``SWEEP_EVERY`` steps (budget unit ``kernels``).  This sees a kernel registered
  through ``torch._C`` directly, which ``_impls`` does not record.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import interception
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.sharding import is_dtensor

MAX_NAMED = interception.MAX_NAMED
SAMPLE = 8  # gradient elements compared per parameter and backward
SWEEP_EVERY = 128  # steps in which every operator's dispatch table is read once


class InterceptionCheck(Check):
    """Modes, saved-tensor hooks, Python kernels and AccumulateGrad node hooks."""

    core = True  # its failure leaves the step unverified: high at once (safety.py)

    unit = "interception"  # budget mode: the state and the node hooks at drawn steps

    def __init__(self, named: list[tuple[str, Any]], key: bytes, kernels: KernelSweep) -> None:
        import torch

        self.torch = torch
        self.key = key
        self.baseline = interception.modes()
        self.library = interception.library_size()
        self.entries = interception.library_entries()
        self.kernels = kernels
        self.broken: list[str] = []  # parameters whose gradient changed inside the node
        self._pending: dict[int, tuple[Any, Any, Any]] = {}
        self.armed = True  # budget mode: whether the next backward's node hooks gather
        self._outside = 0.0  # seconds the armed node hooks spent (charged to the unit)
        self._handles: list[Any] = []
        for name, p in named:
            if not getattr(p, "requires_grad", False) or is_dtensor(p) or p.numel() == 0:
                continue  # a DTensor's .grad is set by FSDP, never accumulated by autograd
            index = _sample(key, name, p.numel(), p.device, torch)
            self._handles.append(p.register_hook(self._before(p, index)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._after(name)))

    # -- the gradient through AccumulateGrad ---------------------------------
    def _before(self, p: Any, index: Any) -> Any:
        def hook(grad: Any) -> None:
            if not self.armed or grad.is_sparse or grad.shape != p.shape:
                return
            started = time.perf_counter()
            old = p.grad
            held = None
            if old is not None and not old.is_sparse and old.shape == p.shape:
                held = old.detach().reshape(-1)[index]  # indexing copies: no clone needed
            self._pending[id(p)] = (index, grad.detach().reshape(-1)[index], held)
            self._outside += time.perf_counter() - started

        return hook

    def _after(self, name: str) -> Any:
        def hook(p: Any) -> None:
            if not self._pending:  # unarmed (budget mode), or nothing gathered before
                return
            found = self._pending.pop(id(p), None)
            if found is None or p.grad is None or p.grad.is_sparse:
                return
            started = time.perf_counter()
            index, incoming, old = found
            expected = incoming if old is None else old + incoming
            now = p.grad.detach().reshape(-1)[index]
            if not self.torch.equal(now, expected) and not _same_with_nans(now, expected):
                self.broken.append(name)
            self._outside += time.perf_counter() - started

        return hook

    # -- the step hooks ----------------------------------------------------------
    def before_step(self, ctx: Context) -> list[Alert]:
        alerts = self._state(ctx)
        if self.broken:
            names, self.broken = sorted(set(self.broken)), []
            alerts.append(
                ctx.alert(
                    "TG1304",
                    "the gradient changed between autograd handing it to a parameter and "
                    "its accumulation into .grad (a hook on the AccumulateGrad node): "
                    f"{', '.join(names[:MAX_NAMED])}",
                    severity=Severity.CRITICAL,
                    tensors=names[:50],
                )
            )
        self._pending.clear()
        return alerts

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._state(ctx)

    def skipped(self, ctx: Context) -> list[Alert]:
        self._pending.clear()  # gathered only when armed: nothing, unless a step nested
        return []

    def arm(self, on: bool) -> None:
        self.armed = on

    def outside_seconds(self) -> float:
        spent, self._outside = self._outside, 0.0
        return spent

    def _state(self, ctx: Context) -> list[Alert]:
        alerts = []
        now = interception.modes()
        if now != self.baseline:
            alerts.append(self._modes_alert(ctx, now))
            self.baseline = now  # each change reported once
        size = interception.library_size()
        if size != self.library:
            entries = interception.library_entries()
            # Kernels of operators that existed at start: an operator defined since (torch
            # defines some when torch.compile first imports its modules) is new code that
            # nothing the step already ran can call.
            added = [e for e in sorted(entries - self.entries) if self.kernels.existing(e)]
            self.library, self.entries = size, entries
            if not added:
                return alerts
            alerts.append(
                ctx.alert(
                    "TG1304",
                    f"Python kernels registered at run time through torch.library: "
                    f"{', '.join(added[:MAX_NAMED]) or '(an entry was replaced)'}",
                    severity=Severity.CRITICAL,
                    functions=added[:50],
                )
            )
            self.kernels.retake(added)  # the sweep reports what else changed, not these
        return alerts

    def _modes_alert(self, ctx: Context, now: tuple[Any, ...]) -> Alert:
        new = interception.differences(self.baseline, now)
        own = all(interception.torch_own(o) for o in new)
        what = [interception.describe(o) for o in new] or ["a mode or hook was removed"]
        if len(now) != len(self.baseline) or new:
            label = ", ".join(what[:MAX_NAMED])
        else:
            label = "the Python dispatcher was switched"
            own = False
        return ctx.alert(
            "TG1304",
            "interception state changed since start (torch function/dispatch modes, "
            f"saved-tensor hooks, Python dispatcher): {label}",
            severity=Severity.MEDIUM if own and new else Severity.CRITICAL,
            functions=what[:50],
        )

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class KernelSweep(Check):
    """The dispatcher's table of every operator, in keyed slices (``SWEEP_EVERY`` steps)."""

    unit = "kernels"  # budget mode: a slice at the steps the schedule draws

    def __init__(self, key: bytes) -> None:
        names = interception.op_names()
        seed = hashlib.blake2b(b"kernel sweep", key=key[:64], digest_size=8).digest()
        random.Random(seed).shuffle(names)  # noqa: S311 - a keyed order, not a secret
        self.names = names
        self.digests = {n: interception.op_digest(n) for n in names}
        self.size = max(1, -(-len(names) // (2 * SWEEP_EVERY)))
        self._at = 0

    def existing(self, entry: str) -> bool:
        """Whether a ``torch.library._impls`` entry ("ns/op/key") names an operator that
        existed at start."""
        return _op_of(entry) in self.digests

    def retake(self, entries: list[str]) -> None:
        """Take the tables of the operators ``torch.library._impls`` entries name."""
        for entry in entries:
            name = _op_of(entry)
            if name in self.digests:
                self.digests[name] = interception.op_digest(name)

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._sweep(ctx)

    def after_step(self, ctx: Context) -> list[Alert]:
        return self._sweep(ctx)

    def _sweep(self, ctx: Context) -> list[Alert]:
        due = self.names[self._at : self._at + self.size]
        self._at = (self._at + self.size) % max(1, len(self.names))
        changed = []
        for name in due:
            now = interception.op_digest(name)
            if now != self.digests[name]:
                changed.append(name)
                self.digests[name] = now
        if not changed:
            return []
        return [
            ctx.alert(
                "TG1304",
                f"kernels registered at run time for {len(changed)} operator(s) "
                f"(the dispatcher's table changed): {', '.join(changed[:MAX_NAMED])}",
                severity=Severity.CRITICAL,
                functions=changed[:50],
            )
        ]


def _op_of(entry: str) -> str:
    parts = entry.split("/")
    return f"{parts[0]}::{parts[1]}" if len(parts) >= 2 else entry


def _sample(key: bytes, name: str, n: int, device: Any, torch: Any) -> Any:
    seed = int.from_bytes(hashlib.blake2b(name.encode(), key=key[:64], digest_size=8).digest())
    picks = random.Random(seed).sample(range(n), min(SAMPLE, n))  # noqa: S311 - keyed
    return torch.tensor(sorted(picks), dtype=torch.long, device=device)


def checks(named: list[tuple[str, Any]], key: bytes) -> list[Check]:
    """The interception checks for these parameters: the per-step state, then the sweep."""
    kernels = KernelSweep(key)
    return [InterceptionCheck(named, key, kernels), kernels]


def _same_with_nans(a: Any, b: Any) -> bool:
    """Equal, where NaN at the same place counts as equal: a diverging honest run (an
    overflowing loss) accumulates NaN gradients, and NaN never equals itself."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
