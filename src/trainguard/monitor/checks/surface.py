"""Any callable a training step can look up was replaced after start (TG1304, critical).

See monitor/surface.py for what is watched and why by identity.  A full sweep
of every namespace costs milliseconds (about 8,000 names), too much for every
step, so each step hook reads three things:

* the *hot* names: during the second step the check runs under
  ``sys.setprofile`` (unless a profiler is already installed) and records
  every surface entry the step called, Python or C, and the Tensor methods;
  from then on those names (and whether a callable was added to their
  namespace, such as a method shadowing TensorBase's on ``torch.Tensor``) are
  read at every hook, so a patch of what the step uses is named at once;
* the next slice of a sweep in a keyed order, which reads every namespace
  once per ``every`` steps (what a step calls only now and then);
* two namespaces drawn at random with the run's key.

Both step hooks check.  A patch put in place only while forward and backward run
(``torch.relu`` replaced when the batch is collated, put back after backward: red
team 4, A18) is right at both; so the hot names are also compared at the start of
every forward with gradients (the root module's pre-hook, monitor/forwards.py) and when
the backward from its output ends (a callback queued on autograd's engine when backward
reaches the output): two identity comparisons of tuples each (the objects under the hot
names, their functions' code; a closure cell swapped only in between is not seen), and
the step's pre-hook names what changed in between (critical).  Budget mode: those
comparisons follow the unit, armed a step ahead.

At start-up, functions installed in torch's namespaces whose code lives
outside torch, the standard library and installed packages are reported at
low severity (frameworks that patch torch at import are installed packages
and stay silent); only changes after start are critical.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import types
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import clock, identity, provenance, surface
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.forwards import ForwardWatch

SWEEP_EVERY = 32  # steps in which the sweep reads every namespace once
SAMPLED = 2  # namespaces drawn at random at each step hook, besides the sweep
MAX_NAMED = 10  # attribute names quoted in one alert message


class SurfaceCheck(Check):
    unit = "surface"  # budget mode: both hooks of a scheduled step; the sweep then slows

    def __init__(
        self, key: bytes, every: int | None = None, forwards: ForwardWatch | None = None
    ) -> None:
        self.key = key
        self.every = max(1, every or SWEEP_EVERY)
        self.spaces = surface.snapshot()
        self.entries = sum(len(s.keys) for s in self.spaces)
        self.hot: list[surface.Space] = []  # what the first step was seen to call
        self._hooks = 0  # step hooks seen (two per step)
        # The sweep's order: keyed, so code cannot tell when a namespace is next read.
        order = random.Random(self._seed("order"))  # noqa: S311 - seeded from a keyed hash
        shuffled = order.sample(self.spaces, len(self.spaces))
        size = -(-len(shuffled) // (2 * self.every))
        self._slices = [surface.Flat(shuffled[i : i + size]) for i in range(0, len(shuffled), size)]
        self._hot = surface.Flat([])
        # Every namespace at once: at the first hook and when the hot names are learned
        # (a patch made before then is not among what the profile records: the step
        # called the wrapper, not the name), a few milliseconds twice per run.
        self._all = surface.Flat(self.spaces)
        self._full = True
        self._learning: _Learner | None = None
        import torch

        self.torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        # Between the step hooks: hot names found changed at a forward or in backward.
        self._between: dict[str, None] = {}
        self._compare = self._compare_next = True  # budget mode: this step's, the next's
        self._spent = 0.0
        self._tensor = torch.Tensor
        # Bound now: the engine object is part of the surface, and a later replacement
        # must not take our end-of-backward callbacks with it.
        self._queue = torch.autograd.Variable._execution_engine.queue_callback
        if forwards is not None:
            forwards.starts.append(self._forward_start)
            forwards.outputs.append(self._forward_end)

    def _seed(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode(), key=self.key[:64], digest_size=8).digest()

    def start(self, ctx: Context) -> list[Alert]:
        trusted = identity._trusted_dirs()
        outside = [
            f"{s.label}.{k} from {identity.origin(v)}"
            for s in self.spaces
            if s.label.startswith("torch")
            for k, v in zip(s.keys, s.values, strict=True)
            if isinstance(v, types.FunctionType) and _foreign(s, k, v, trusted)
        ]
        if not outside:
            return []
        return [
            ctx.alert(
                "TG1304",
                f"{len(outside)} function(s) in torch's namespaces come from outside "
                f"installed code (installed before watch() started): "
                f"{'; '.join(outside[:MAX_NAMED])}",
                severity=Severity.LOW,
                functions=outside[:50],
                at_start=True,
            )
        ]

    def before_step(self, ctx: Context) -> list[Alert]:
        return self._said_between(ctx, self._check(ctx))

    def after_step(self, ctx: Context) -> list[Alert]:
        alerts = self._said_between(ctx, self._check(ctx))
        if self._learning is not None:  # one whole step has run under the profiler
            self._learning.stop()
            self.hot = self._learning.parts()
            self._hot = surface.Flat(self.hot)
            self._learning = None
            self._full = True
            alerts += self._check(ctx)
        elif not self.hot and ctx.step == 0 and sys.getprofile() is None:
            self._learning = _Learner(self.spaces)
        return alerts

    # -- between the step hooks (A18) ------------------------------------------------
    def _forward_start(self, grad: bool) -> None:
        if grad and self._compare:
            self._compare_hot()

    def _forward_end(self, output: Any) -> None:
        """Hook the output backward starts from: compare there and at backward's end."""
        if not self._compare:
            return
        found = _first_grad_tensor(output, self._tensor)
        if found is not None:
            found.register_hook(self._backward)

    def _backward(self, grad: Any) -> None:
        try:
            self._queue(self._compare_hot)
        except RuntimeError:  # not inside an engine's backward (called by hand)
            pass

    def _compare_hot(self) -> None:
        started = clock.now()
        try:
            if not self._hot.replaced():  # the common case: two tuple comparisons
                return
            for space in self._hot.changed():
                self._between.update(dict.fromkeys(space.differences(self.torch_dir)))
        finally:
            self._spent += clock.now() - started

    def _said_between(self, ctx: Context, said: list[Alert]) -> list[Alert]:
        """Names found changed between the hooks that the hook itself did not name (put
        back since: the patch was there only while forward and backward ran)."""
        if not self._between:
            return said
        named = {n for a in said for n in a.evidence.get("functions", [])}
        names = [n for n in self._between if n not in named]
        self._between.clear()
        if not names:
            return said
        return [
            *said,
            ctx.alert(
                "TG1304",
                f"patched while forward or backward ran, and put back before the step "
                f"({len(names)} attribute(s)): {', '.join(names[:MAX_NAMED])}",
                severity=Severity.CRITICAL,
                functions=names[:50],
                between=True,
            ),
        ]

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        alerts = self._said_between(ctx, [])  # a step whose hooks did not run (skipped)
        self._compare = self._compare_next
        return alerts

    def arm(self, on: bool) -> None:
        self._compare_next = on

    def outside_seconds(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    def close(self) -> None:
        if self._learning is not None:
            self._learning.stop()
            self._learning = None

    def _due(self) -> list[surface.Space]:
        """Changed among: the hot names, the next slice of the keyed sweep, and two
        namespaces drawn at random."""
        if self._full:
            self._full = False
            return self._all.changed()
        swept = self._slices[self._hooks % len(self._slices)] if self._slices else None
        self._hooks += 1
        pick = random.Random(self._seed(f"hook {self._hooks}"))  # noqa: S311 - keyed seed
        sample = pick.sample(self.spaces, min(SAMPLED, len(self.spaces)))
        found = self._hot.changed() + (swept.changed() if swept is not None else [])
        return found + [s for s in sample if not s.same()]

    def _check(self, ctx: Context) -> list[Alert]:
        changed = self._due()
        if not changed:
            return []
        names = sorted({n for s in changed for n in s.differences(self.torch_dir)})
        labels = {c.label for c in changed}
        for s in self.spaces + self.hot:
            if s.label in labels:
                s.take()  # report each change once, whichever view saw it
        for flat in [self._hot, self._all, *self._slices]:
            if any(s.label in labels for s in flat.spaces):
                flat.rebuild()
        if not names:
            return []  # torch wrapped its own functions (torch.compile loading dynamo)
        return [
            ctx.alert(
                "TG1304",
                f"patched at run time ({len(names)} attribute(s)): {', '.join(names[:MAX_NAMED])}",
                severity=Severity.CRITICAL,
                functions=names[:50],
            )
        ]


class _Learner:
    """Records, for one step, which surface entries are called (``sys.setprofile``)."""

    def __init__(self, spaces: list[surface.Space]) -> None:
        import torch

        self.tensor = torch.Tensor
        self.by_id: dict[int, list[tuple[int, str]]] = {}
        for i, s in enumerate(spaces):
            for k, v in zip(s.keys, s.values, strict=True):
                self.by_id.setdefault(id(v), []).append((i, k))
                if isinstance(v, types.FunctionType):
                    self.by_id.setdefault(id(v.__code__), []).append((i, k))
        self.spaces = spaces
        self.base = {s.label: i for i, s in enumerate(spaces)}
        self.seen: set[tuple[int, str]] = set()
        sys.setprofile(self._profile)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.seen.update(self.by_id.get(id(frame.f_code), ()))
        elif event == "c_call":
            self.seen.update(self.by_id.get(id(arg), ()))
            if isinstance(getattr(arg, "__self__", None), self.tensor):
                # A Tensor method: looked up on torch.Tensor first, then TensorBase.
                for label in ("torch.Tensor", "torch._C.TensorBase"):
                    self.seen.add((self.base[label], arg.__name__))

    def stop(self) -> None:
        if sys.getprofile() == self._profile:
            sys.setprofile(None)

    def parts(self) -> list[surface.Space]:
        names: dict[int, set[str]] = {}
        for i, key in self.seen:
            names.setdefault(i, set()).add(key)
        return [
            surface.part(self.spaces[i], keys)
            for i, keys in sorted(names.items())
            if not surface.immutable(self.spaces[i].ns)  # nothing can be set there
        ]


def _first_grad_tensor(output: Any, tensor: type) -> Any:
    """A tensor of a forward's output that backward starts from (the output, or an item
    of a tuple, list or dict of it), or None."""
    items: Any
    if isinstance(output, tensor):
        items = (output,)
    elif isinstance(output, dict):
        items = tuple(output.values())
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return None
    for item in items:
        if isinstance(item, tensor) and getattr(item, "requires_grad", False):
            return item
    return None


def _foreign(
    space: surface.Space, key: str, fn: types.FunctionType, trusted: tuple[str, ...]
) -> bool:
    """Whether a function's code is not from installed code: frozen stdlib modules are,
    and so are methods a class decorator generated for this very class (dataclasses
    compile ``__init__`` and ``__eq__`` from a ``<string>`` in the class's module)."""
    where = fn.__code__.co_filename
    if where.startswith("<frozen "):
        return False
    if where == "<string>" and isinstance(space.ns, type):
        return fn.__qualname__ != f"{space.ns.__qualname__}.{key}" or not _installed(
            space.ns.__module__, trusted
        )
    where = identity.origin(fn)
    if where.startswith(_torch_dir()):
        # A file name is whatever compile() was told: code claiming torch's files must
        # be code torch compiled (red team #8 forged one after start; before start too).
        return not provenance.torch_code().owns(fn)
    return not where.startswith(trusted)


def _torch_dir() -> str:
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _installed(module: str, trusted: tuple[str, ...]) -> bool:
    path = getattr(sys.modules.get(module), "__file__", None)
    return isinstance(path, str) and os.path.abspath(path).startswith(trusted)
