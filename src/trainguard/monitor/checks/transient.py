"""Weights and training flags that differ only while forward and backward run (red team 4, F8).

Every other check compares at the optimizer's hooks and at ``guard.step``.  Weights
zeroed through ``.data`` (no version counter moves) when the batch is collated and
put back bit for bit after backward, or ``model.eval()`` for the first micro-batches
of an accumulated step and ``train()`` for the last, are right at each of those
looks and wrong in between: the gradient, and so the update, came from another
model.  The invariant: at the start of every forward with gradients enabled,

* each parameter is the tensor the last ``guard.step`` left (same storage pointer),
  and its keyed sample elements hold the same bits (with several optimizers on one
  model, a tensor whose version counter moved was written by another optimizer's step
  within the step, and becomes the reference) -- TG1301 at that step;
* the modules' ``training`` flags are those of the step's first such forward, and,
  from the second step on, those the last step trained with -- TG1318 at that step
  (a deliberate switch is declared with ``guard.step(changed=["training"])``).

Only a forward the gradient came from is judged: a forward that differs registers a hook
on its output's tensors, and its finding is kept only if backward reaches them.  An
evaluation pass with gradients on (``model.eval()`` without ``no_grad``, EMA weights
swapped in for it and back) is honest and never backpropagated: it was TG1318/TG1301
before.  An output the check cannot read (not tensors in tuples, lists or dicts) is
judged at once.

Cost at each forward with gradients: one attribute pair per parameter, a gather of
``SAMPLES`` elements per parameter and one comparison, and a tuple of the modules'
flags.  Budget mode: the unit ``transient``, armed a step ahead (the reference is
taken at the ``guard.step`` before a drawn step, its forwards compared).  Not seen:
a model sharded by FSDP (its parameters' storage moves at every forward: skipped,
said once), elements outside the keyed sample of a partial edit.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.forwards import (
    DECLARED_ANY,
    Change,
    ForwardWatch,
    Held,
    declared_names,
)
from trainguard.monitor.kinds import unreadable
from trainguard.monitor.sharding import is_dtensor

SAMPLES = 64  # keyed elements per parameter read at each forward start
MAX_HOOKED = 8  # output tensors hooked per differing forward (any of them carries it)
MAX_OUTPUT_ITEMS = 256  # items of an output read to find its tensors (nested two deep)


class TransientCheck(Check):
    unit = "transient"
    core = True  # it sees the weights the gradient came from: its failure is high at once
    # Entered with the step, before a closure: forwards inside optimizer.step (LBFGS's
    # line search, SAM's second pass) run on weights the step itself wrote.
    at_entry = True

    def __init__(
        self, model: Any, forwards: ForwardWatch, key: bytes, *, several: bool = False
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.held = Held()
        self.several = several  # several optimizers on the model (their steps write it)
        self.params = [(n, p) for n, p in model.named_parameters() if unreadable(p) is None]
        sharded = any(is_dtensor(p) for _, p in self.params) or any(
            type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()
        )
        gen = torch.Generator().manual_seed(int.from_bytes(key[16:24], "little") & (2**62))
        # By parameter name, like the other checks' sample indices (the self-check reads them).
        self.index: dict[str, Any] = {
            n: torch.randint(0, max(p.numel(), 1), (min(SAMPLES, p.numel()),), generator=gen).to(
                p.device
            )
            for n, p in self.params
        }
        self.weights_on = not sharded
        self._armed_next = True  # exact mode: every step
        self._active = True  # this step's forwards are compared
        self._spent = 0.0
        self._in_step = False  # between the step's entry and its post-hook
        self._declared = False  # inside guard.outside_step()
        self._off: list[str] = []  # weights found off at a forward, judged at the step
        self._reference: list[tuple[int, int, Any]] | None = None
        self._flags: tuple[bool, ...] | None = None  # what the last step trained with
        self._step_flags: tuple[bool, ...] | None = None  # this step's first forward's
        self._said: set[str] = set()
        # The modules whose flags the step's finding names (all of them, for declarations).
        self._flag_modules: list[str] = []
        self._found: list[tuple[str, str, str, dict[str, Any]]] = []  # until guard.step
        # What the running forward differs in (weights off, its flags), judged if its
        # output is backpropagated.
        self._pending: tuple[list[str], tuple[bool, ...]] | None = None
        self._remember()
        forwards.starts.append(self._forward_start)
        forwards.outputs.append(self._forward_end)

    def _state(self) -> list[tuple[int, int, Any]]:
        index = self.index
        return [
            (p._version, p.data_ptr(), p.detach().reshape(-1)[index[n]]) for n, p in self.params
        ]

    def _remember(self) -> None:
        self._reference = self._state() if self.weights_on else None

    def _training(self) -> tuple[bool, ...]:
        return tuple([m.training for m in self.model.modules()])

    def _forward_start(self, grad: bool) -> None:
        self._pending = None
        if not grad or not self._active or self._in_step or self._declared:
            return
        started = clock.now()
        try:
            off = self._compare_weights()
            flags = self._training()
            base = self._step_flags if self._step_flags is not None else self._flags
            if not off and base is not None and flags == base:
                if self._step_flags is None:
                    self._step_flags = flags
                return
            self._pending = (off, flags)
        finally:
            self._spent += clock.now() - started

    def _forward_end(self, output: Any) -> None:
        """A forward that differed: judged when backward reaches its output (a hook on
        its tensors), never if nothing backpropagates it (an evaluation pass)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        tensors = _grad_tensors(output, self.torch)
        if tensors is None:  # an output we cannot read: the gradient may come from it
            self._used(*pending)
            return
        once = [False]

        def reached(grad: Any) -> None:
            if not once[0]:
                once[0] = True
                self._used(*pending)

        for tensor in tensors[:MAX_HOOKED]:
            tensor.register_hook(reached)

    def _used(self, off: list[str], flags: tuple[bool, ...]) -> None:
        """A differing forward the gradient came from: its weights and flags judged."""
        self._off += [n for n in off if n not in self._off]
        base = self._step_flags if self._step_flags is not None else self._flags
        if self._step_flags is None:
            self._step_flags = flags
        if base is not None and flags != base:
            self._compare_flags(flags, base)

    def _compare_weights(self) -> list[str]:
        ref = self._reference
        if ref is None:
            return []
        now = self._state()
        off: list[str] = []
        for k, ((name, _), (v0, ptr0, s0), (v1, ptr1, s1)) in enumerate(
            zip(self.params, ref, now, strict=True)
        ):
            if ptr1 == ptr0 and self.torch.equal(s0, s1):
                continue
            if v1 != v0 and self.several and ptr1 == ptr0:
                # written in place since: another optimizer's step within this step (a
                # GAN's critic); then what it wrote is the reference
                ref[k] = (v1, ptr1, s1)
                continue
            # One optimizer: nothing writes the weights between guard.step and the next
            # forward (an EMA swapped in for evaluation is swapped back: same bits), and a
            # version bump does not launder a transient edit.
            off.append(name)
        return off

    def _compare_flags(self, flags: tuple[bool, ...], base: tuple[bool, ...]) -> None:
        if "training" in self._said:
            return
        names = [
            n or "<model>"
            for (n, _), a, b in zip(self.model.named_modules(), flags, base, strict=False)
            if a != b
        ]
        self._said.add("training")
        self._flag_modules = names
        self._found.append(
            (
                "training",
                "TG1318",
                f"a forward with gradients ran with other training flags than the step's "
                f"(eval() for some micro-batches?): {', '.join(names[:5])}",
                {"modules": names[:50]},
            )
        )

    def outside_block(self, inside: bool) -> None:
        """``guard.outside_step()`` (SAM's ascent, Lookahead): forwards inside the block run
        on weights the loop declared it wrote; what it leaves is the reference."""
        self._declared = inside
        if not inside and self._active:
            self._remember()

    def before_step(self, ctx: Context) -> list[Alert]:
        self._in_step = True  # a closure's forwards are the step's own (see at_entry)
        # A weight found off at a forward and still off now is an edit that stayed: the
        # tamper check's (TG1301 there); one put back since is this check's finding.
        if self._off and self._reference is not None:
            now = dict(zip((n for n, _ in self.params), self._state(), strict=True))
            ref = dict(zip((n for n, _ in self.params), self._reference, strict=True))
            back = [
                n
                for n in self._off
                if now[n][1] == ref[n][1] and self.torch.equal(now[n][2], ref[n][2])
            ]
            if back:
                self._found.append(
                    (
                        "weights",
                        "TG1301",
                        f"a forward with gradients ran on weights other than those the last "
                        f"step left, put back before the step (storage or bits): "
                        f"{', '.join(back[:5])}",
                        {"tensors": back[:50]},
                    )
                )
        self._off = []
        return []

    def after_step(self, ctx: Context) -> list[Alert]:
        """At the optimizer's post-hook: what the step wrote is the reference (a loop
        whose optimizer steps again before guard.step, a step of kind "repeat")."""
        self._in_step = False
        if self._active:
            self._remember()
        return []

    def arm(self, on: bool) -> None:
        self._armed_next = on

    def outside_seconds(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        declared = declared_names(end.declared_changes)
        # A switch declared module by module as the settings check names it ("bn.training",
        # the root's "training") declares this check's finding too: one declaration serves
        # both checks' view of the same change.
        if self._flag_modules and all(
            ("training" if m == "<model>" else f"{m}.training") in declared
            for m in self._flag_modules
        ):
            declared.setdefault("training", DECLARED_ANY)
        for name, rule, message, evidence in self._found:  # at the step they happened in
            self.held.add(Change(name, None, ctx.alert(rule, message, **evidence), by_value=False))
        self._found = []
        out = self.held.release(ctx, declared)
        if self._active and self._step_flags is not None:
            self._flags = self._step_flags
        self._step_flags, self._said, self._in_step, self._off = None, set(), False, []
        self._flag_modules = []
        # The next step's forwards are compared with what this step left.
        self._active = self._armed_next
        if self._active:
            started = clock.now()
            self._remember()
            self._spent += clock.now() - started
        else:
            self._reference = None
        return out


def _grad_tensors(output: Any, torch: Any) -> list[Any] | None:
    """The tensors of a forward's output that gradients can flow from (tensors in tuples,
    lists and dicts, two levels deep; scalars, strings and None left out), or None when
    it holds something else: the gradient may come from what we cannot read."""
    found: list[Any] = []
    stack: list[tuple[Any, int]] = [(output, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_OUTPUT_ITEMS:
            return None
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                found.append(item)
        elif item is None or isinstance(item, (bool, int, float, str)):
            continue
        elif isinstance(item, (tuple, list)) and depth < 2:
            stack += [(x, depth + 1) for x in item]
        elif isinstance(item, dict) and depth < 2:
            stack += [(x, depth + 1) for x in item.values()]
        else:
            return None
    return found
