"""What a loop declared it does to the gradients between backward and ``optimizer.step``.

The gradient factor (monitor/gradfactor.py) allows only ONE positive factor of what
backward left.  Honest loops do more, and declare it to ``watch``:

* ``grad_clipping="per_tensor"``: parameter subsets clipped separately;
* ``grad_scaling="varying"``: a per-step division (by the tokens in the batch): any
  positive factor, still one for every gradient;
* ``grad_transform=fn``: the loop's own transform (adaptive gradient clipping,
  gradient centralization, rows of an embedding zeroed so only new tokens train).
  ``fn(name, param, grad)`` returns the gradient the loop leaves for that parameter
  (or None after changing ``grad`` in place); the loop applies the same function:
  ``for n, p in model.named_parameters(): p.grad = fn(n, p, p.grad)``.

A declared transform is verified, not trusted: at each step the probe checks, the
guard keeps a copy of every gradient backward left, applies ``fn`` to the copy and
compares the result, at the keyed sample elements, with what reaches the optimizer,
up to the one positive factor clipping and unscaling after it may add.  So the
transform the loop declared is the only one it may apply: a flip, a layer zeroed or
noise on top of it is still TG1306.  ``fn`` must be deterministic and depend only on
the parameter and its gradient; it runs on the guard's copy first, then (in the
loop) on the gradient.  Its code is held from ``watch`` on, and so is what the code
reads, by value (monitor/valuedigest.py: defaults, closure contents, a partial's
args and keywords, a callable object's attributes, the globals the code reads): code
swapped in mid-run, or ``fn.__defaults__``, ``fn.keywords["clip"]`` or a module
global changed (red team s5 A2: the guard applies the changed fn to its copy too,
so the comparison alone agrees) is TG1306 at the step it is seen.  Cost: one copy of
the gradients per backward, at the steps the probe checks (every step in exact mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor.gradfactor import Clipping, Scaling
from trainguard.monitor.valuedigest import ValueDigest

GradTransform = Callable[[str, Any, Any], Any]


@dataclass(frozen=True)
class GradRules:
    """What may happen to the gradients between backward and the step (watch's options)."""

    clipping: Clipping = "global"
    scaling: Scaling = "fixed"
    transform: GradTransform | None = None

    @classmethod
    def of(cls, options: Any) -> GradRules:
        return cls(options.grad_clipping, options.grad_scaling, options.grad_transform)


DEFAULT_RULES = GradRules()


def _code(fn: Any) -> Any:
    """What runs when ``fn`` is called: a function's code, a partial's function's, a
    callable object's ``__call__``'s (its class too, which a swap would change)."""
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        return (_code(inner), getattr(fn, "args", None), getattr(fn, "keywords", None))
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code
    # the __call__ a call finds (the first class on the MRO that has one)
    call = next(
        (k.__dict__["__call__"] for k in type(fn).__mro__ if "__call__" in k.__dict__), None
    )
    return (type(fn), getattr(call, "__code__", call))


class DeclaredTransform:
    """The loop's declared gradient transform, applied to the guard's copy of backward's
    gradient (see the module docstring)."""

    def __init__(self, fn: GradTransform) -> None:
        if not callable(fn):
            raise UsageError(f"watch: grad_transform must be callable, not {type(fn).__name__}")
        self.fn = fn
        self._code = _code(fn)
        self._values = ValueDigest(self._roots)

    def _roots(self) -> list[tuple[str, Any]]:
        return [("grad_transform", self.fn)]

    def moved(self) -> str | None:
        """A message when the function's code, or what it reads, is no longer what
        ``watch`` was given."""
        try:
            same = _code(self.fn) == self._code
        except Exception:  # a comparison that raises is not the code we held
            same = False
        if not same:
            return "the declared grad_transform's code changed since watch() started"
        changed = self._values.changed()
        if not changed:
            return None
        return (
            "what the declared grad_transform computes with changed since watch() started "
            "(its defaults, closure, partial arguments or the globals it reads): "
            f"{', '.join(changed[:5])}"
        )

    def apply(self, name: str, param: Any, grad: Any) -> Any:
        """``fn`` on the guard's own copy of backward's gradient; raises what it raises."""
        out = self.fn(name, param.detach(), grad)
        out = grad if out is None else out
        if not hasattr(out, "shape") or tuple(out.shape) != tuple(grad.shape):
            raise ValueError(
                f"it returned {type(out).__name__} of shape {getattr(out, 'shape', None)}, "
                f"not the gradient's {tuple(grad.shape)}"
            )
        return out
