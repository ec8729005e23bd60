"""When the model's forward runs, and what a training loop declared it changed.

Modules change some of their own state inside ``forward``: BatchNorm's running
statistics, a rotary table's cache, an EMA codebook.  Nothing else may change
it between steps.  To tell the two apart without a list of module types, the
guard needs to know when a forward starts and ends: :class:`ForwardWatch`
puts one pre-hook and one post-hook on the model's root module (trainguard's
own code, in the model's hook registry, which the identity check then
watches like any other) and calls its listeners there.

Under ``torch.compile`` the hooks are traced into the model's graph; there
they do nothing (``torch.compiler.is_compiling()``), so compiling, with
``fullgraph=True`` too, is unaffected, and the listeners are not called: the
checks that rely on them then look for the model's ``torch.compile`` wrapper,
which runs in eager Python, and hook it instead.  A loop that never calls the
root module (Lightning's ``training_step`` calls its layers) gets hooks on every
submodule, the outermost call being the forward.  When neither sees a forward
the checks say once that they see none (TG1315) instead of checking nothing
silently.

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


# Dicts followed per level when looking for the compiled wrapper (frames' locals
# and other holders of the model are dicts too).
MAX_REFERRER_DICTS = 32


class ForwardWatch:
    """Root-module forward hooks that call listeners at each forward's start and end."""

    def __init__(self, model: Any) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.starts: list[Listener] = []
        self.ends: list[Callable[[], None]] = []
        self.outputs: list[Callable[[Any], None]] = []  # given the root forward's output
        self.depth = 0  # > 0 while a forward of the root module runs (re-entrant models)
        self.seen = 0  # forwards whose start the listeners saw
        self._wrappers: list[Any] = []  # torch.compile wrappers hooked (adopt_compiled)
        self._all = False  # whether every submodule is hooked (adopt_submodules)
        self._compiling = torch.compiler.is_compiling
        self._handles = [
            model.register_forward_pre_hook(GuardHook(self._pre, self)),
            model.register_forward_hook(GuardHook(self._post, self), always_call=True),
        ]

    def _pre(self, module: Any, args: Any) -> None:
        if self._compiling():  # traced into a compiled graph: nothing to run there
            return
        self.seen += 1
        self.depth += 1
        if self.depth == 1:
            grad = bool(self.torch.is_grad_enabled())
            for listener in self.starts:
                listener(grad)

    def _post(self, module: Any, args: Any, output: Any) -> None:
        if self._compiling():
            return
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            for listener in self.ends:
                listener()
            for took in self.outputs:
                took(output)

    def adopt_compiled(self) -> bool:
        """Hook the ``torch.compile`` wrapper of the model, if there is one.

        The wrapper (``OptimizedModule``, made after ``watch()`` started) is called in
        eager Python and holds the model as ``_orig_mod``; its own hooks run outside
        the compiled graph.  Found by the objects that refer to the model (its
        ``_modules`` dict, then the dict's owner): a Python loop over every live object
        took seconds in a large process, long enough for the watchdog to call it a hang."""
        import gc
        import sys
        import warnings

        optimized = getattr(getattr(self.torch, "_dynamo", None), "eval_frame", None)
        kind = getattr(optimized, "OptimizedModule", None)
        if kind is None or not _dynamo_compiled_any(sys.modules.get("torch._dynamo.utils")):
            # Nothing compiled yet: no wrapper runs a forward, and the heap walks below
            # (seconds in a large process under load: a Lightning loop that calls the
            # layers, not the root, was reported as a hang at its first step) buy nothing.
            return False
        with warnings.catch_warnings():  # isinstance on deprecated aliases warns, on dead
            # weak proxies raises (_is)
            warnings.simplefilter("ignore")
            # model <- wrapper._modules <- wrapper.__dict__ <- wrapper: three levels of dicts.
            found, frontier = [], [self.model]
            for _ in range(3):
                refs = gc.get_referrers(*frontier)  # one walk of the heap per level
                found += [r for r in refs if _is(r, kind)]
                frontier = [r for r in refs if type(r) is dict][:MAX_REFERRER_DICTS]
        for obj in found:
            if getattr(obj, "_orig_mod", None) is self.model:
                if any(obj is w for w in self._wrappers):
                    continue
                self._wrappers.append(obj)
                self._handles += [
                    obj.register_forward_pre_hook(GuardHook(self._pre, self)),
                    obj.register_forward_hook(GuardHook(self._post, self), always_call=True),
                ]
                return True
        return False

    def adopt_submodules(self) -> bool:
        """Hook every submodule: a loop that never calls the root (a LightningModule's
        ``training_step`` calls ``self.layer(x)``) starts its forward at the outermost
        submodule call.  Each module call then costs a hook call (a few microseconds)."""
        if self._all:
            return False
        self._all = True
        for _, m in self.model.named_modules():
            if m is self.model:
                continue
            self._handles += [
                m.register_forward_pre_hook(GuardHook(self._pre, self)),
                m.register_forward_hook(GuardHook(self._post, self), always_call=True),
            ]
        return True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class GuardHook:
    """One of the guard's hooks in a module's hook registry.

    A model is copied whole, hook registries included, by ``copy.deepcopy`` (keeping
    the best model, starting an EMA mid-run) and pickled whole by ``torch.save(model)``:
    a bound method of the watcher would drag the guard, and the ``torch`` module it
    holds, into the copy (``cannot pickle 'module' object``), and a copy that
    called the guard would be watched as if it were the model.  A copy of this hook
    is :func:`detached` instead: the copy runs as the model did before ``watch()``,
    and unpickling it needs only trainguard importable.  (Parameters' own hooks are
    not copied by torch: ``Parameter.__deepcopy__`` and ``__reduce_ex__`` drop them.)
    """

    __slots__ = ("call", "owner")

    def __init__(self, call: Callable[..., None], owner: ForwardWatch) -> None:
        self.call = call
        self.owner = owner

    def __call__(self, *args: Any) -> None:
        self.call(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return detached

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _detached, ()


def detached(*args: Any) -> None:
    """What a copied model holds where the watched one holds a guard hook: nothing runs."""
    return None


def _detached() -> Callable[..., None]:
    return detached


def _dynamo_compiled_any(utils: Any) -> bool:
    """Whether dynamo has done anything in this process (any of its own counters: which
    ones move depends on the backend: aot_eager with fullgraph moves "stats", not
    "frames"); counters that cannot be read say yes, so the wrapper is still looked for."""
    try:
        if utils is None:
            return False
        return any(n for group in list(utils.counters.values()) for n in list(group.values()))
    except Exception:  # a private structure that may change shape
        return True


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


def _is(obj: Any, kind: type) -> bool:
    try:
        return isinstance(obj, kind)
    except ReferenceError:  # a weak proxy whose object is gone
        return False
