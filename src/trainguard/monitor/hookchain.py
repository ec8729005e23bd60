"""Gradient hooks installed before ``watch()``, verified by what they do, not by their code.

``p.register_hook(fn)`` runs ``fn`` on the gradient autograd hands ``p`` before it is
accumulated into ``p.grad``; ``fn`` may return a replacement.  A hook the guard finds at
start-up whose code is not the guard's or torch's machinery is reported (hookcode.py:
``torch.neg`` is torch's code and flips a gradient), so an honest read-only logging
hook (wandb.watch style: reads the norm, returns None) was TG1304 high.

The invariant instead of the code's origin: a read-only chain leaves the gradient as
autograd computed it.  For each parameter whose ``_backward_hooks`` hold such hooks at
start-up, the guard puts a hook of its own FIRST in that chain (it sees autograd's
gradient before any other hook) and a post-accumulate hook after it: ``p.grad`` after
accumulation must equal what ``p.grad`` held before plus autograd's gradient, at the
keyed sample elements.  A hook that changed the gradient is TG1306 at that step, and
the start-up report of verified chains is medium.  Checked at the steps the gradient
probe checks (every step in exact mode).  The chain's registry is held from start-up
by the identity check as before: a hook added, removed or reordered mid-run is still
TG1304 there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from trainguard.monitor import hookcode
from trainguard.monitor.kinds import unreadable
from trainguard.monitor.safety import compile_safe

# autograd's accumulation is one addition in the gradient's dtype: the guard's own sum
# of the same two values is the same bits; the tolerance only covers a loop whose hooks
# return an equal tensor computed otherwise (a clone, a cast back and forth).
RTOL = 1e-5


class FirstHook:
    """The guard's hook at the head of a parameter's chain (``witnessed`` looks for it).
    Its call runs :meth:`ChainWitness.incoming` itself, looked up on the class, whatever
    ``owner`` is: a FirstHook runs only that code, which reads and returns None."""

    def __init__(self, owner: ChainWitness, p: Any) -> None:
        self.owner, self.p = owner, p

    def __call__(self, grad: Any) -> None:
        ChainWitness.incoming(self.owner, self.p, grad)


class ChainWitness:
    def __init__(
        self, params: list[tuple[str, Any]], index: dict[int, Any], armed: Callable[[], bool]
    ) -> None:
        self.index = index
        self.armed = armed
        self.changed: list[str] = []  # parameters whose chain changed the gradient
        self.handles: list[Any] = []
        self.outside = 0.0
        self._expected: dict[int, Any] = {}
        for name, p in params:
            hooks = getattr(p, "_backward_hooks", None)
            if not hooks or id(p) not in index:
                continue
            if all(hookcode.trusted(h) for h in hooks.values()):
                continue
            self._first(name, p, hooks)

    def _first(self, name: str, p: Any, hooks: Any) -> None:
        """Our hook first in ``hooks`` (the same dict object: autograd holds it and calls its
        entries in the dict's own order, which OrderedDict.move_to_end does not change)."""
        handle = p.register_hook(FirstHook(self, p))
        ours = hooks.pop(handle.id)
        others = list(hooks.items())
        hooks.clear()
        hooks[handle.id] = ours
        hooks.update(others)
        after = p.register_post_accumulate_grad_hook(compile_safe(self._accumulated(name)))
        self.handles += [handle, after]

    def incoming(self, p: Any, grad: Any) -> None:
        """autograd's gradient for ``p`` (plus what ``p.grad`` holds), before any hook."""
        pid = id(p)
        if not self.armed() or pid not in self.index:
            return
        started = time.perf_counter()
        try:
            if unreadable(grad) is not None or grad.shape != p.shape:
                self._expected.pop(pid, None)
                return
            idx = self.index[pid]
            came = grad.detach().reshape(-1)[idx].double()
            held = p.grad
            if held is not None and unreadable(held) is None:
                came = came + held.detach().reshape(-1)[idx].double()
            self._expected[pid] = came
        except Exception:  # unread: this pass is not judged
            self._expected.pop(pid, None)
        finally:
            self.outside += time.perf_counter() - started

    def _accumulated(self, name: str) -> Callable[[Any], None]:
        def hook(p: Any) -> None:
            expected = self._expected.pop(id(p), None)
            if expected is None or p.grad is None or unreadable(p.grad) is not None:
                return
            started = time.perf_counter()
            try:
                now = p.grad.detach().reshape(-1)[self.index[id(p)]].double()
                off = float((now - expected).norm())
                if off > RTOL * float(expected.norm()) + 1e-30 and name not in self.changed:
                    self.changed.append(name)
            except Exception:  # a gradient of another shape: the probe names it
                return
            finally:
                self.outside += time.perf_counter() - started

        return hook

    def take(self) -> list[str]:
        found, self.changed = self.changed, []
        return found

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def witnessed(hooks: Any) -> bool:
    """Whether a tensor's hook chain starts with the guard's witness (identity.audit)."""
    first = next(iter(hooks.values()), None) if hooks else None
    return type(first) is FirstHook
