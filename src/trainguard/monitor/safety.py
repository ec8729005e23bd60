"""The guard's code runs inside the user's training step: it must never end it.

Two rules, applied where the guard calls into checks and where torch calls into
the guard:

* A check that raises is a finding, not a crash: its phase's alerts become one
  TG1315 note at medium severity naming the check, the phase and the error
  (what that check covers went unchecked at this step: never a silent "clean").
  A check that keeps failing is blind, and making a check raise (a tensor it
  cannot read, an attribute it trips on) is a way to blind it: from the
  ``QUIET_FAILURES + 1``-th failure of the same check and phase in a run on, the
  note is high.  Our checks do not raise on honest training; one that does is a
  bug worth a report either way.  A *core* check (``Check.core``: the weights between
  steps, their update, the code and state that compute it) is high at its first
  failure: a step whose weights changed unverified is never a quiet step (red team 3
  F3: a tensor subclass in the optimizer state that raised once hid that step's weight
  edit behind one medium note).
* The guard's hooks run as plain Python under ``torch.compile``.  A compiled
  ``optimizer.step`` calls the step hooks from inside the traced frame; traced,
  dynamo inlined the guard and its checks (copying their module globals into
  ``torch.optim.optimizer``, which the identity check then reported as a patch)
  and compiled the checks' sample reads into the step's graph, where they
  broke it.  ``torch.compiler.disable`` makes each hook a graph break instead.
  Its wrapper costs a few microseconds per call, also when nothing compiles (a hook
  per parameter in backward adds up): :func:`compile_safe` calls the disabled twin only
  when dynamo is tracing (``is_compiling()``, a constant True while it traces, so the
  traced hook is a call to the twin: a graph break) or its frame callback is set (a
  compiled function's frames run around the hook: dynamo would compile the hook's own
  frames), and the plain function otherwise.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context

log = logging.getLogger("trainguard.monitor")


QUIET_FAILURES = 2  # failures of one check and phase in a run noted at medium
# Names of the core checks' classes (filled by ``Check.__init_subclass__``): their first
# failure is high.  By class name, as ``checked`` is called with it.
CORE: set[str] = set()


def checked(
    name: str,
    phase: str,
    ctx: Context,
    call: Callable[[], list[Alert]],
    failures: Counter[str] | None = None,
) -> list[Alert]:
    """``call()``'s alerts; when it raises, one note that the check failed instead.

    ``failures``: the run's count of failures per check and phase (the guard's);
    past ``QUIET_FAILURES`` the note is high: the check is blind.  A core check's
    note is high at once."""
    try:
        return call()
    except Exception as e:  # a check never ends the user's step
        log.debug("trainguard: %s.%s failed", name, phase, exc_info=True)
        key = f"{name}.{phase}"
        count = 1
        if failures is not None:
            failures[key] += 1
            count = failures[key]
        core = name in CORE
        blind = count > QUIET_FAILURES or core
        message = (
            f"the {name} check failed in {phase} ({type(e).__name__}: {_text(e)}): "
            f"what it covers went unchecked at this step"
        )
        if core:
            message += (
                "; it is a core check (the weights, their update, the code computing "
                "it): this step's weights changed unverified"
            )
        if count > QUIET_FAILURES:
            message += (
                f"; it has now failed at {count} steps of this run: what it covers is "
                "blind, as a check made to fail on purpose would be"
            )
        return [
            ctx.alert(
                "TG1315",
                message,
                severity=Severity.HIGH if blind else Severity.MEDIUM,
                key=key,
                error=_text(e, 500, repr),
                failures=count,
            )
        ]


def _text(e: BaseException, limit: int = 200, how: Callable[[object], str] = str) -> str:
    """``how(e)`` cut to ``limit``; an exception whose own ``__str__`` or ``__repr__``
    raises (a way to make the note itself fail) is named by its type."""
    try:
        return how(e)[:limit]
    except Exception:
        return f"<{type(e).__name__}, unprintable>"


class StepNesting:
    """How deep the guard's step hooks are nested in the current optimizer step.

    torch wraps a class's ``step`` with its hook-running wrapper when the first
    optimizer of that class is made; a ``step`` patched after that and calling the
    wrapped one is wrapped again by the next optimizer, so each step runs the hooks
    twice, nested: the outer pair around the whole patched step, the inner pair
    around torch's step only.  Seen from the inner pair, a patch that negated the
    gradients before calling torch's step looks honest.  Only the outermost pair
    checks.  ``reset`` at each ``guard.step``: a step that raised never ran its
    post-hooks, and must not leave the next step counted as nested.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.nested = 0  # steps whose hooks ran nested (noted in the step record)

    def reset(self) -> None:
        self.depth = 0


def compile_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a hook torch may call from a compiled frame: plain Python when nothing
    is being traced, ``torch.compiler.disable(fn)`` (a graph break) when dynamo traces
    the call.  Only closure cells are read (no module globals for dynamo to copy into
    the frame it traces)."""
    import torch

    disable: Any = torch.compiler.disable  # untyped in torch
    twin: Callable[..., Any] = disable(fn)
    tracing = torch.compiler.is_compiling
    dynamo = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    callback = getattr(dynamo, "get_eval_frame_callback", None)
    if callback is None:  # a torch without the callback's getter: always the twin
        return twin

    def hook(*args: Any, **kwargs: Any) -> Any:
        if tracing() or callback() is not None:
            return twin(*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


def step_hooks(
    before: Callable[[], None],
    after: Callable[[], None],
    nesting: StepNesting,
    *,
    entry: Callable[[], None] | None = None,
    rest: Callable[[], None] | None = None,
) -> tuple[Any, Any]:
    """The optimizer's step pre- and post-hook for the guard, left out of torch.compile;
    only the outermost pair of a nested step runs the checks (:class:`StepNesting`).

    ``optimizer.step(closure)`` (torch's closure API: LBFGS, SAM-style loops,
    Lightning) runs forward and backward inside the step, after the pre-hooks: checked
    there, the gradients are the last step's (the update model then finds this step's
    update off Adam's math: false TG1306).  So when a closure is passed, the pre-hook
    hands the step a wrapped closure and the pre-step checks run when it first returns:
    torch's optimizers call it before they write anything, and LBFGS calls it again
    between its own writes, which belong to the step.  A step that never calls the
    closure is checked at its post-hook, before the post-step checks (never unchecked).

    ``entry`` and ``rest`` (both or neither): with a closure, ``entry`` runs at the
    pre-hook itself (the weights as the last step left them: SAM writes its perturbation
    before calling the closure, which is the step's own work) and ``rest`` in place of
    ``before`` once the closure returns.
    """
    waiting = [False]  # a closure was handed over and has not returned yet
    later = rest if rest is not None else before

    def pre(opt: Any, args: Any, kwargs: Any) -> Any:
        nesting.depth += 1
        if nesting.depth == 1:
            wrapped = _closure_checked(args, kwargs, waiting, later)
            if wrapped is not None:
                if entry is not None:
                    entry()
                return wrapped
            waiting[0] = False
            before()
        elif nesting.depth == 2:
            nesting.nested += 1
        return None

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        if nesting.depth > 1:
            nesting.depth -= 1
            return
        nesting.depth = 0
        if waiting[0]:
            waiting[0] = False
            later()
        after()

    return compile_safe(pre), compile_safe(post)


def _closure_checked(
    args: Any, kwargs: Any, waiting: list[bool], before: Callable[[], None]
) -> tuple[Any, Any] | None:
    """The step's ``(args, kwargs)`` with its closure wrapped to run ``before`` once,
    when it first returns; None when no closure is passed.  torch's hook wrapper passes
    ``args`` with the optimizer first: ``step(closure)``'s closure is ``args[1]``."""
    if kwargs.get("closure") is not None:
        closure, at = kwargs["closure"], None
    elif len(args) > 1 and callable(args[1]):
        closure, at = args[1], 1
    else:
        return None
    waiting[0] = True

    def run() -> Any:
        result = closure()
        if waiting[0]:
            waiting[0] = False
            before()
        return result

    if at is None:
        return args, {**kwargs, "closure": run}
    return (args[0], run, *args[2:]), kwargs
