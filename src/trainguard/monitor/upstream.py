"""Code that makes the gradient before it reaches the parameters, held like the model's.

Red team s5 (issue #12, family 1): the guard saw the gradient at each parameter's
``AccumulateGrad`` node and after it (monitor/gradfactor.py, checks/direction.py,
checks/interception.py), so a gradient made wrong *upstream* passed every check:

* a forward hook on the criterion that puts a tensor hook on the logits and flips
  the gradient of one class (A), a forward pre-hook on it that rewrites labels (A2):
  even with ``watch(loss_fn=crit)`` only the criterion's settings and buffers were
  held (checks/lossfn.py), not its hook registries;
* the model's own ``torch.autograd.Function`` subclass with its ``backward`` replaced
  mid-run (G): the model's classes and ``forward`` were routes, the Function class
  its forward calls was not followed;
* an HF Trainer's ``compute_loss_func`` set by a callback mid-run (H): the loss is
  the Trainer's attribute, no part of the model.

The invariant is the one monitor/identity.py holds for the model: what runs is what
ran when the guard started.  Here are the routes for these three places; they join
the identity check's (TG1304: reported at start-up by what their hooks run, critical
when they change mid-run; in budget mode the ``identity`` unit).  What a hook put on
a tensor *during* a step does is not in any registry; checks/outputgrad.py holds the
model's output gradient to what the criterion handed it.
"""

from __future__ import annotations

import builtins
import dis
import types
from typing import Any

from trainguard.monitor.identity import (
    MODULE_REGISTRIES,
    Route,
    _attr,
    _module_instance,
    _registry,
    _space_route,
    functions,
    layers,
)

MAX_CODE = 2_000  # code objects followed from a model's forward code
MAX_FUNCTIONS = 64  # autograd.Function classes held per model
# What an HF Trainer's loss reads from its arguments (transformers' compute_loss).
TRAINER_ARGS = (
    "label_smoothing_factor",
    "gradient_accumulation_steps",
    "average_tokens_across_devices",
    "max_grad_norm",
    "past_index",
)


def routes(model: Any, loss_fn: Any = None) -> list[Route]:
    """The criterion's routes (when given) and the autograd Functions the model's and
    the criterion's forward code reach.  Taken (baselines set) before they return."""
    import torch

    found: list[Route] = []
    roots = [model]
    if isinstance(loss_fn, torch.nn.Module):  # anything else: checks/lossfn.py refuses it
        found += criterion_routes(loss_fn)
        roots.append(loss_fn)
    for cls in autograd_functions(roots):
        mine = [c for c in cls.__mro__ if not _torch_own(c)]
        found.append(_space_route(f"autograd.Function {cls.__module__}.{cls.__qualname__}", *mine))
    for r in found:
        r.take()
    return found


def criterion_routes(loss_fn: Any) -> list[Route]:
    """The loss module held like the model: its classes, a ``forward`` set on an instance,
    and every hook registry, whose hooks all count as able to change gradients (a
    forward hook on a criterion sees the logits and the labels and makes the loss)."""
    found = [_space_route(f"loss_fn class {c.__qualname__}", c) for c in _classes(loss_fn)]
    for mname, m in loss_fn.named_modules():
        where = f"loss_fn{'.' + mname if mname else ''}"
        found.append(Route(f"{where} (class, forward)", _module_instance(m)))
        for reg in MODULE_REGISTRIES:
            found.append(
                Route(f"{where} {reg}", _registry(m, reg), registry=reg, owner=m, gradients=True)
            )
    return found


def _classes(module: Any) -> list[type]:
    return list({type(m): None for m in module.modules()})


def trainer_routes(trainer: Any) -> list[Route]:
    """An HF Trainer's loss: ``compute_loss_func``, a ``compute_loss`` set on the instance,
    its classes, the label smoother, the callbacks (each can set any of these), and the
    arguments the loss reads.  Held from the start of training."""
    found = [
        Route("trainer.compute_loss_func", _attr(trainer, "compute_loss_func")),
        Route("trainer.label_smoother", _attr(trainer, "label_smoother")),
        Route("trainer (class, compute_loss)", _module_instance_attr(trainer, "compute_loss")),
        Route("trainer callbacks", _callbacks(trainer)),
        Route("trainer.args (what the loss reads)", _args(trainer)),
    ]
    found += [
        _space_route(f"trainer class {c.__qualname__}", c) for c in type(trainer).__mro__[:-1]
    ]
    for r in found:
        r.take()
    return found


def _module_instance_attr(obj: Any, name: str) -> Any:
    return lambda: (type(obj), *layers(vars(obj).get(name)))


def _callbacks(trainer: Any) -> Any:
    def read() -> tuple[Any, ...]:
        handler = getattr(trainer, "callback_handler", None)
        found = list(getattr(handler, "callbacks", None) or [])
        return (handler, len(found), *found, *[type(c) for c in found])

    return read


def _args(trainer: Any) -> Any:
    def read() -> tuple[Any, ...]:
        args = getattr(trainer, "args", None)
        return (args, *[getattr(args, n, None) for n in TRAINER_ARGS])

    return read


def find_trainer(frame: Any, kind: type, depth: int = 12) -> Any:
    """The Trainer whose method called this callback: its ``self`` in a calling frame
    (the callback handler is given no trainer).  None when none is found."""
    for _ in range(depth):
        if frame is None:
            return None
        found = frame.f_locals.get("self")
        if isinstance(found, kind):
            return found
        frame = frame.f_back
    return None


# -- the autograd Functions a model's forward code reaches -----------------------------
def autograd_functions(roots: list[Any]) -> list[type]:
    """``torch.autograd.Function`` subclasses the forward code of these modules reaches:
    by the global names its code loads (and attributes of modules it names), its
    closures, the module instances' attributes, following the functions and classes of
    code outside torch (torch's own code is the surface's: monitor/surface.py)."""
    import torch

    base = torch.autograd.Function
    found: dict[type, None] = {}
    todo: list[tuple[types.CodeType, dict[str, Any]]] = []
    seen: set[int] = set()
    looked: set[int] = set()

    def consider(value: Any, names: tuple[str, ...] = ()) -> None:
        if id(value) in looked or len(looked) > 10 * MAX_CODE:
            return
        looked.add(id(value))
        if isinstance(value, type):
            if issubclass(value, base) and value is not base:
                found[value] = None
                targets: list[Any] = [value]
            elif _torch_own(value):
                return
            else:
                targets = list(vars(value).values())
            for v in targets:
                for f in functions(v) if v is not value else _methods(value):
                    follow(f)
        elif isinstance(value, types.ModuleType):
            if value.__name__.startswith("torch"):
                return
            for n in names:  # the attributes the code reads off a module it names
                if n in vars(value):
                    consider(vars(value)[n])
        else:
            for f in functions(value):
                follow(f)

    def follow(f: types.FunctionType) -> None:
        if f.__module__ and str(f.__module__).startswith("torch"):
            return
        for cell in f.__closure__ or ():
            try:
                consider(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        todo.append((f.__code__, f.__globals__))

    for root in roots:
        for m in root.modules():
            consider(type(m))
            for v in list(vars(m).values()):
                if isinstance(v, type) or isinstance(v, types.FunctionType):
                    consider(v)
    while todo and len(seen) < MAX_CODE and len(found) < MAX_FUNCTIONS:
        code, space = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        todo += [(c, space) for c in code.co_consts if isinstance(c, types.CodeType)]
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                name = str(ins.argval)
                value = space.get(name, vars(builtins).get(name))
                consider(value, tuple(code.co_names))
    return list(found)[:MAX_FUNCTIONS]


def _methods(cls: type) -> list[types.FunctionType]:
    """The functions a Function subclass defines (forward, backward, setup_context, jvp,
    vmap...), its own and its bases' outside torch."""
    return [
        f for c in cls.__mro__ if not _torch_own(c) for v in vars(c).values() for f in functions(v)
    ]


def _torch_own(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "builtins" or module.split(".")[0] == "torch" or cls is object
