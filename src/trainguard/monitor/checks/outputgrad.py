"""The gradient the model's output receives is the one the loss handed it (TG1304).

Red team s5 (A): a forward hook on the criterion put a tensor hook on the logits
(``logits.register_hook(lambda g: g * flip)``) on half the steps.  A hook on a non-leaf
tensor lives on the tensor's autograd node, made during the step and gone after it:
no registry the guard can hold at start-up has it, and every check after the
parameters' ``AccumulateGrad`` nodes sees a gradient that is consistently wrong.

The invariant, read where autograd runs: the model's root forward post-hook
(monitor/forwards.py) puts a tensor hook on each output tensor, first of its hooks, and
a pre-hook and a post-hook on the output's node.  Autograd runs a node's tensor hooks,
then its pre-hooks, then the node, then its post-hooks, which are given the gradient the
node was called with.  At the guard's pre-hook every tensor hook on the output has run
(registered after the guard's: by the criterion's forward hook, by the loop): the
gradient must be the tensor the guard's tensor hook saw, its version counter unmoved
(not written in place) and equal at a keyed sample of elements (a write through
``.data`` moves no counter); a replacement is compared whole.  At the post-hook, a
gradient replaced by a node pre-hook registered after the guard's is compared whole
with the one before; the same tensor written in place is not judged there: the node's
own backward may do that (a custom Function's ``g.mul_(-1)``), and the two cannot be
told apart.

Out of reach, and why: a hook on a tensor *inside* the criterion (between the logits
and the loss: what the guard's first hook sees is already made), a pre-hook on the
output's node registered after the guard's that writes in place (above), a post-hook
on it (it rewrites what flows into the model, after the guard's post-hook) and hooks
on nodes inside the model: nothing in torch lists them.  Passing the
criterion (``watch(loss_fn=crit)``) holds its hook registries (monitor/upstream.py);
``trainguard replay`` recomputes the gradient whatever made it.  In budget mode this
is the unit ``outputgrad``: armed a step ahead, its hooks are put on at drawn steps.
"""

from __future__ import annotations

import array
import hashlib
import time
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.forwards import ForwardWatch

SAMPLE = 64  # gradient elements compared per output tensor and backward
MAX_OUTPUTS = 8  # output tensors watched per forward (a tuple, a dict, a ModelOutput)


class OutputGradientCheck(Check):
    """Hooks on the model's output during a step must leave its gradient as it came."""

    unit = "outputgrad"  # budget mode: hooks put on at drawn steps only

    def __init__(self, forwards: ForwardWatch, key: bytes) -> None:
        import torch

        self.torch = torch
        self.key = key[:64]
        self.armed = True
        self.changed: list[str] = []  # what was found, for the next step hook
        self._forwards = 0  # forwards hooked: the sample differs at each
        self._outside = 0.0
        forwards.outputs.append(self._forward_end)

    def _forward_end(self, output: Any) -> None:
        if not self.armed or not self.torch.is_grad_enabled():
            return
        started = time.perf_counter()
        self._forwards += 1
        for label, t in _tensors(output, self.torch):
            if t.requires_grad and t.grad_fn is not None and t.numel() > 0:
                self._watch(label, t)
        self._outside += time.perf_counter() - started

    def _watch(self, label: str, t: Any) -> None:
        # Keyed elements, fresh at each forward (SHAKE after the secret key: no extension
        # attack on a sponge); drawn with replacement: a set and a sort cost more than a
        # repeated index.
        drawn = hashlib.shake_256(self.key + f"{self._forwards}:{label}".encode())
        n = t.numel()
        picks = [v % n for v in array.array("I", drawn.digest(4 * SAMPLE))]
        index = self.torch.tensor(picks, dtype=self.torch.long, device=t.device)
        came: dict[str, Any] = {}

        def first(grad: Any) -> None:  # the output's first tensor hook: the gradient as handed
            if grad is None or grad.is_sparse:
                return
            came["grad"] = grad
            came["version"] = grad._version
            came["values"] = grad.detach().reshape(-1)[index]  # indexing copies

        def early(grad_outputs: Any) -> None:  # the node's first pre-hook: tensor hooks ran
            if "grad" not in came:
                return
            started = time.perf_counter()
            now = grad_outputs[nr] if nr < len(grad_outputs) else None
            if self._same(came["grad"], came["version"], came["values"], index, now):
                came["seen"] = now  # what later pre-hooks and the node start from
            else:
                self.changed.append(label)
                came.clear()
            self._outside += time.perf_counter() - started

        def last(grad_inputs: Any, grad_outputs: Any) -> None:  # given what the node got
            seen = came.get("seen")
            came.clear()
            if seen is None:
                return
            now = grad_outputs[nr] if nr < len(grad_outputs) else None
            # The same tensor: the node itself may write its gradient in place (a custom
            # Function's backward), so only a replacement is judged: compared whole.
            if now is not seen and (now is None or not _alike(now, seen) or not _equal(now, seen)):
                self.changed.append(label)

        nr = t.output_nr
        t.register_hook(first)
        t.grad_fn.register_prehook(early)
        t.grad_fn.register_hook(last)

    def _same(self, before: Any, version: int, values: Any, index: Any, now: Any) -> bool:
        if now is None or not _alike(now, before):
            return False
        if before._version != version:
            return False  # written in place by a hook
        if now is before:  # a write through .data moves no counter: the keyed sample
            return _equal(now.detach().reshape(-1)[index], values)
        return _equal(now, before)  # replaced, the one handed over intact: compare whole

    # -- the step hooks ----------------------------------------------------------
    def before_step(self, ctx: Context) -> list[Alert]:
        if not self.changed:
            return []
        names, self.changed = sorted(set(self.changed)), []
        return [
            ctx.alert(
                "TG1304",
                "the gradient the model's output received was changed after the loss "
                "handed it over (a hook put on the output tensor or its autograd node "
                f"during the step): {', '.join(names)}",
                severity=Severity.CRITICAL,
                tensors=names,
            )
        ]

    def skipped(self, ctx: Context) -> list[Alert]:
        self.changed = []
        return []

    def arm(self, on: bool) -> None:
        self.armed = on

    def outside_seconds(self) -> float:
        spent, self._outside = self._outside, 0.0
        return spent


def _tensors(output: Any, torch: Any) -> list[tuple[str, Any]]:
    """The output's tensors: itself, or the items of a tuple, list or dict (ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    if isinstance(output, dict):
        items = [(f"output[{k!r}]", v) for k, v in list(output.items())]
    elif isinstance(output, (tuple, list)):
        items = [(f"output[{i}]", v) for i, v in enumerate(output)]
    else:
        return []
    return [(k, v) for k, v in items if isinstance(v, torch.Tensor)][:MAX_OUTPUTS]


def _alike(a: Any, b: Any) -> bool:
    return bool(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device)


def _equal(a: Any, b: Any) -> bool:
    """Bit for bit, NaN at the same place counting as equal (a diverging honest run)."""
    import torch

    if torch.equal(a, b):  # one call, the usual answer
        return True
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
