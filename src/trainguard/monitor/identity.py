"""Code identity: is the training machinery still made of the objects it started with?

A *route* is a place where code the training step runs is looked up by name:
the optimizer's class and every class in its MRO, the modules those classes
live in (``torch.optim.adam.adam``, ``_single_tensor_adam``, ...), clipping,
seeding, autograd, the loss functions, the data loader's iterator, fetcher and
collate function, the model's own classes and their ``forward``, and the time
functions the guard's clock came from.  For each route the guard keeps the
objects installed when it started (every value of the namespace, and of each
function the code object, defaults, and every layer under ``__wrapped__``), and
compares them by identity (``is``) at each check: a ``functools.wraps``
wrapper, a swapped ``__code__``, a new attribute, a ``__class__`` swap all
differ, whatever they claim to be.  No list of known patches is involved.

Hook registries (global, per module, per parameter, per optimizer) are routes
too.  At start-up, the guard cannot know what was installed before it: it
reports (``audit``) every hook that can change gradients or the update unless
it runs only trainguard's code or torch's distributed machinery (hookcode.py:
``p.register_hook(torch.neg)`` is torch's code and flips a gradient), forward
hooks whose code lives outside torch and trainguard, and functions on torch's
routes whose code lives outside torch, the standard library and installed
packages (code from a script, ``exec`` or a pickle).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trainguard.monitor import clock, hookchain, hookcode
from trainguard.monitor.compiled import dynamo_global, only_torch_compile
from trainguard.monitor.forwards import ForwardWatch, GuardHook

MAX_LAYERS = 16  # __wrapped__ / __func__ chains followed at most this deep
_TRAINGUARD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Registries whose hooks can change gradients or the update (the others see activations).
GRADIENT_REGISTRIES = (
    "_backward_hooks",
    "_backward_pre_hooks",
    "_post_accumulate_grad_hooks",
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_optimizer_pre_hooks",
    "_global_optimizer_post_hooks",
)
MODULE_REGISTRIES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
TENSOR_REGISTRIES = ("_backward_hooks", "_post_accumulate_grad_hooks")


def layers(obj: Any) -> Iterator[Any]:
    """The objects a callable is made of, outermost first, through wrappers and bound methods."""
    for _ in range(MAX_LAYERS):
        if obj is None:
            return
        if isinstance(obj, types.MethodType):  # a new object at each attribute read
            yield obj.__self__
            obj = obj.__func__
            continue
        yield obj
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
            continue
        if isinstance(obj, types.FunctionType):
            yield obj.__code__
            yield obj.__defaults__
            yield obj.__kwdefaults__
        inner = obj.__dict__.get("__wrapped__") if hasattr(obj, "__dict__") else None
        obj = inner if inner is not obj else None


def functions(obj: Any) -> list[types.FunctionType]:
    """The Python functions among ``layers(obj)``."""
    return [o for o in layers(obj) if isinstance(o, types.FunctionType)]


@dataclass
class Route:
    """One place code is looked up (namespaces, an attribute, a registry) and what it held."""

    label: str
    read: Callable[[], tuple[Any, ...]]  # the objects installed now
    torch_route: bool = False  # its functions must be torch's own code
    registry: str = ""  # a hook registry: its attribute name
    owner: Any = None  # a hook registry: the object holding it
    baseline: tuple[Any, ...] = field(default=())
    spaces: tuple[Any, ...] = ()  # namespaces: to name the attributes that changed
    # A registry every hook of which can change gradients, whatever its kind (the loss
    # module's forward hooks rewrite the loss or the labels: monitor/upstream.py).
    gradients: bool = False
    _values: list[dict[str, tuple[Any, list[tuple[Any, Any]]]]] = field(default_factory=list)

    def hooks(self) -> list[Any]:
        """The hooks a registry route's registry holds now (none for other routes)."""
        reg = getattr(self.owner, self.registry, None) if self.registry else None
        return list(reg.values()) if reg else []

    def take(self) -> None:
        self.baseline = self.read()
        self._values = [
            {k: (v, [(f, f.__code__) for f in functions(v)]) for k, v in list(vars(ns).items())}
            for ns in self.spaces
        ]

    def describe(self) -> str:
        """The route, naming the attributes that differ from the baseline (namespaces)."""
        names = []
        for ns, before in zip(self.spaces, self._values, strict=True):
            now = vars(ns)
            prefix = getattr(ns, "__qualname__", None) or getattr(ns, "__name__", "?")
            for key in sorted(set(now) | set(before)):
                old, codes = before.get(key, (None, []))
                if (
                    key not in before
                    or now.get(key) is not old
                    or any(f.__code__ is not c for f, c in codes)
                ):
                    names.append(f"{prefix}.{key}")
        return f"{self.label}: {', '.join(names[:5])}" if names else self.label

    def changed(self) -> bool:
        now = self.read()
        try:
            # Tuple comparison tries identity first, element by element, in C; objects
            # that are not identical compare by value (an equal code object is harmless).
            return bool(now != self.baseline)
        except Exception:  # an object whose == raises (a tensor) is not the one we saw
            return True


def _space_route(label: str, *spaces: Any, torch_route: bool = False) -> Route:
    return Route(label, _namespaces(*spaces), torch_route, spaces=spaces)


def _namespaces(*spaces: Any) -> Callable[[], tuple[Any, ...]]:
    """Every value of these namespaces, and the code, defaults and closure of their
    functions (and of the functions they wrap), as found when the route was made."""
    fns = [f for ns in spaces for v in list(vars(ns).values()) for f in functions(v)]
    dicts = [vars(ns) for ns in spaces]
    tables = [t for d in dicts for t in list(d.values()) if _table(t)]

    def read() -> tuple[Any, ...]:
        out: list[Any] = []
        for d in dicts:
            out.extend(d.values())
        for t in tables:  # a dispatch table's entries (collate's map by type), by identity
            out.append(len(t))
            out.extend(t.keys())
            out.extend(t.values())
        out.extend([f.__code__ for f in fns])
        out.extend([f.__defaults__ for f in fns])
        out.extend([f.__kwdefaults__ for f in fns])
        out.extend([f.__closure__ for f in fns])
        out.extend(fns)  # for the start-up audit
        return tuple(out)

    return read


def _table(value: Any) -> bool:
    """A dispatch table: a dict whose values are all code (collate's
    ``default_collate_fn_map``: an entry replaced rewrites every batch of that type)."""
    return type(value) is dict and bool(value) and all(callable(v) for v in value.values())


def _attr(obj: Any, name: str) -> Callable[[], tuple[Any, ...]]:
    def read() -> tuple[Any, ...]:
        found = list(layers(getattr(obj, name, None)))
        codes = [f.__code__ for f in found if isinstance(f, types.FunctionType)]
        return (*found, *codes)

    return read


def _registry(obj: Any, name: str) -> Callable[[], tuple[Any, ...]]:
    def read() -> tuple[Any, ...]:
        reg = getattr(obj, name, None)
        if not reg:
            return ()
        return tuple([o for h in list(reg.values()) if not _own(h) for o in layers(h)])

    return read


def _own(hook: Any) -> bool:
    """The guard's own forward hooks (monitor/forwards.py): it adds them to submodules or
    to a compiled wrapper when the model's forward goes unseen, mid-run, on purpose."""
    if type(hook) is not GuardHook or not isinstance(hook.owner, ForwardWatch):
        return False
    # Its call must be the watcher's own method: a GuardHook built around other code is not.
    return getattr(hook.call, "__func__", None) in (ForwardWatch._pre, ForwardWatch._post)


def routes(model: Any, optimizer: Any, dataloader: Any = None) -> list[Route]:
    """Every route the guard watches for this model, optimizer and data loader."""
    import torch
    import torch.nn.modules.module as module_mod
    import torch.optim.optimizer as optim_mod

    found: list[Route] = [
        Route("optimizer.__class__", lambda: (type(optimizer),)),
        Route("optimizer.step", _attr(optimizer, "step")),
        Route("optimizer.zero_grad", _attr(optimizer, "zero_grad")),
        Route("the guard's clock and OS reads (time.*, os.pread/open/close)", _clock),
    ]
    modules: dict[str, Any] = {}
    own: dict[str, list[type]] = {}  # the optimizer's classes outside torch, by module
    for cls in type(optimizer).__mro__[:-1]:
        torch_route = cls.__module__.startswith("torch")
        found.append(_space_route(f"{cls.__qualname__} (class)", cls, torch_route=torch_route))
        if torch_route:
            modules[cls.__module__] = sys.modules.get(cls.__module__)
        else:
            own.setdefault(cls.__module__, []).append(cls)
    for name, classes in own.items():
        mod = sys.modules.get(name)
        if mod is not None:
            found.append(_globals_route(name, mod, classes))
    names = [
        "torch.nn.utils",
        "torch.nn.utils.clip_grad",
        "torch.random",
        "torch.autograd",
        "torch.autograd.variable",  # Variable._execution_engine runs every backward
        "torch.nn.functional",
        "torch.nn.modules.loss",
        "torch.utils.data.dataloader",
        "torch.utils.data._utils.fetch",
        "torch.utils.data._utils.collate",
    ]
    modules.update({n: sys.modules.get(n) for n in names})
    for name, mod in modules.items():
        if mod is not None:
            found.append(_module_route(name, mod))
    for name in ("manual_seed", "seed", "set_rng_state"):
        found.append(Route(f"torch.{name}", _attr(torch, name), True))
    found.append(Route("torch.Tensor.backward", _attr(torch.Tensor, "backward"), True))
    for cls in {type(m) for m in model.modules()}:
        found.append(_space_route(f"model class {cls.__qualname__}", cls))
    for mname, m in model.named_modules():
        found.append(Route(f"model {mname or 'root'} (class, forward)", _module_instance(m)))
        for reg in MODULE_REGISTRIES:
            found.append(
                Route(f"model {mname or 'root'} {reg}", _registry(m, reg), registry=reg, owner=m)
            )
    for pname, p in model.named_parameters():
        for reg in TENSOR_REGISTRIES:
            found.append(
                Route(f"parameter {pname} {reg}", _registry(p, reg), registry=reg, owner=p)
            )
    for reg in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        found.append(
            Route(
                f"optimizer hooks ({reg})", _registry(optim_mod, reg), registry=reg, owner=optim_mod
            )
        )
    for reg in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        found.append(
            Route(
                f"optimizer hooks ({reg})", _registry(optimizer, reg), registry=reg, owner=optimizer
            )
        )
    for reg in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        found.append(
            Route(
                f"module hooks ({reg})", _registry(module_mod, reg), registry=reg, owner=module_mod
            )
        )
    if dataloader is not None:
        found.append(Route("dataloader.__class__", lambda: (type(dataloader),)))
        found.append(Route("dataloader.collate_fn", _attr(dataloader, "collate_fn")))
        for what in ("dataset", "sampler", "batch_sampler"):
            part = getattr(dataloader, what, None)
            if part is not None:
                found.append(_space_route(f"dataloader.{what} class", type(part)))
                found.append(Route(f"dataloader.{what}.__class__", _type_of(part)))
    for r in found:
        r.take()
    return found


def _clock() -> tuple[Any, ...]:
    """The time and OS functions replaced since trainguard captured them (clock.py)."""
    return tuple(clock.patched())


def _globals_route(name: str, mod: Any, classes: list[type]) -> Route:
    """A module outside torch that defines the optimizer (a SAM in the training script):
    the globals its classes' code reads, and those read by the functions and classes of
    the module that code reaches, whether bound yet or not (a global added later to
    shadow a builtin counts).  Not the whole namespace: a script that defines its
    optimizer and runs its loop at module level rebinds the loop's globals (``x``,
    ``loss``, ``step``) every step, which the optimizer's code never reads."""
    space = vars(mod)
    names = _global_loads(classes, space)
    if DYNAMIC.intersection(names):
        # Code that can look names up by string (globals()["RHO"], sys.modules[...])
        # reads what its bytecode does not name: the whole namespace, as for torch's.
        return _module_route(name, mod)

    module = space.get("__name__")

    def read() -> tuple[Any, ...]:
        values = tuple([space.get(n) for n in names])
        # What the old whole-namespace route also saw: the namespaces of the module's own
        # classes it reads (Knobs.rho_scale = 1000), and its functions' code, defaults
        # and closures.
        out: list[Any] = list(values)
        for v in values:
            if inspect.isclass(v) and v.__module__ == module:
                out.extend(list(vars(v).values()))
        for v in list(out):
            for f in functions(v):
                out += [f.__code__, f.__defaults__, f.__kwdefaults__, f.__closure__]
        return tuple(out)

    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return Route(f"{name} (globals the optimizer's code reads: {shown})", read)


def _global_loads(classes: list[type], space: dict[str, Any]) -> list[str]:
    """The global names the code of ``classes`` loads, following what they name in
    ``space`` (its functions, and classes defined in the module) and nested code."""
    import dis

    module = space.get("__name__")
    todo: list[types.CodeType] = [
        f.__code__
        for cls in classes
        for v in list(vars(cls).values())
        for f in functions(v)
        if f.__globals__ is space  # not torch's step wrapper around it
    ]
    seen: set[int] = set()
    names: set[str] = set()
    while todo and len(seen) < MAX_CODE_OBJECTS:
        code = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for ins in dis.get_instructions(code):
            if ins.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or ins.argval in names:
                continue
            names.add(str(ins.argval))
            value = space.get(str(ins.argval))
            reached = [value]
            if inspect.isclass(value) and value.__module__ == module:
                reached = list(vars(value).values())
            todo += [f.__code__ for v in reached for f in functions(v)
                     if getattr(f, "__globals__", None) is space]  # fmt: skip
    return sorted(names)


MAX_CODE_OBJECTS = 5_000  # code objects one optimizer's module is followed through
# Globals through which code reads other globals by name, out of its bytecode's sight.
DYNAMIC = frozenset({"globals", "vars", "eval", "exec", "__import__", "sys", "importlib"})


def _module_route(name: str, mod: Any) -> Route:
    # Classes defined in the module are namespaces of their own (fetchers, iterators, losses).
    classes = [v for v in vars(mod).values() if inspect.isclass(v) and v.__module__ == mod.__name__]
    return _space_route(name, mod, *classes, torch_route=name.startswith("torch"))


def _module_instance(m: Any) -> Callable[[], tuple[Any, ...]]:
    """A model module's class and any ``forward`` set on the instance itself."""
    return lambda: (type(m), *layers(vars(m).get("forward")))


def _type_of(obj: Any) -> Callable[[], tuple[Any, ...]]:
    return lambda: (type(obj),)


def changed(found: list[Route]) -> list[str]:
    """Labels of the routes whose objects differ from their baseline; takes the new baseline."""
    out = []
    for r in found:
        if r.changed():
            if not only_torch_compile(r):  # torch.compile's own wrappers and globals
                out.append(r.describe())
            r.take()  # report each change once
    return out


# -- what was installed before the guard started --------------------------------
def _trusted_dirs() -> tuple[str, ...]:
    import torch

    paths = sysconfig.get_paths()
    dirs = {os.path.dirname(os.path.abspath(torch.__file__)), _TRAINGUARD_DIR}
    dirs.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)
    return tuple([os.path.abspath(d) + os.sep for d in dirs])


def origin(fn: types.FunctionType) -> str:
    return os.path.abspath(fn.__code__.co_filename)


# Methods that dataclasses and namedtuple write with exec() ("<string>" as their file).
GENERATED = frozenset(
    ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__new__")
)


def _generated(fn: types.FunctionType) -> bool:
    return fn.__code__.co_filename == "<string>" and fn.__name__ in GENERATED


def _frozen_stdlib(fn: types.FunctionType) -> bool:
    """A function of a frozen standard-library module (``abc.abstractmethod``: "<frozen abc>").

    Its code has no file to place, so it is trusted only if it is the very object
    its frozen module holds under its name: a look-alike compiled with the same
    fake file name is not.
    """
    module = sys.modules.get(fn.__module__ or "")
    spec = getattr(module, "__spec__", None)
    if module is None or spec is None or spec.origin != "frozen":
        return False
    return getattr(module, fn.__qualname__, None) is fn


def audit(found: list[Route]) -> list[tuple[str, str, bool]]:
    """(route, what, affects gradients) for what looks installed by someone before start-up.

    Gradient and update hooks that are not trainguard's or torch's distributed
    machinery, whatever their code's origin; forward hooks whose code is not
    trainguard's or torch's own; functions on torch's routes whose code is not in
    torch, the standard library or an installed package.
    """
    import torch

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    trusted = _trusted_dirs()
    out = []
    for r in found:
        if r.registry:
            hooks = [h for h in r.hooks() if not _own(h)]
            gradients = r.gradients or r.registry in GRADIENT_REGISTRIES
            if gradients:
                # Whatever its code's origin (torch.neg is torch's): only the guard's own
                # and torch's distributed machinery may change gradients (hookcode.py).
                foreign = {hookcode.name(h) for h in hooks if not hookcode.trusted(h)}
            else:
                foreign = {
                    _where(f)
                    for h in hooks
                    for f in hookcode.targets(h)
                    if not _where(f).startswith((torch_dir, _TRAINGUARD_DIR))
                }
            if foreign:
                what = f"hook(s) {', '.join(sorted(foreign)[:3])}"
                if gradients and _verified(r):
                    what += " (verified read-only at each step checked: TG1306 if not)"
                    gradients = False
                out.append((r.label, what, gradients))
        elif r.torch_route:
            outside = {
                f"{where} = {f.__qualname__} from {origin(f)}"
                for where, f in _named_functions(r)
                if not origin(f).startswith(trusted) and not _generated(f) and not _frozen_stdlib(f)
            }
            outside |= set(_foreign_objects(r, trusted))
            if outside:
                out.append((r.label, "; ".join(sorted(outside)[:3]), True))
    if clock.patched():
        out.append(("time", f"{', '.join(clock.patched())} replaced before trainguard", True))
    return out


def _verified(r: Route) -> bool:
    """A parameter's tensor hooks whose chain the guard's witness heads: what they do to the
    gradient is checked at each step the probe checks (monitor/hookchain.py)."""
    import torch

    if r.registry != "_backward_hooks" or not isinstance(r.owner, torch.nn.Parameter):
        return False
    return hookchain.witnessed(getattr(r.owner, r.registry, None))


def _where(f: Any) -> str:
    """A hook target's code file ("<builtin>" for what has none)."""
    return origin(f) if isinstance(f, types.FunctionType) else "<builtin>"


def _named_functions(r: Route) -> Iterator[tuple[str, types.FunctionType]]:
    """(where it is installed, function) for each function a route held at its baseline."""
    if not r.spaces:
        for f in r.baseline:
            if isinstance(f, types.FunctionType):
                yield r.label, f
        return
    for ns in r.spaces:
        prefix = getattr(ns, "__qualname__", None) or getattr(ns, "__name__", "?")
        for key, value in list(vars(ns).items()):
            if dynamo_global(key, value):
                continue  # a compiled frame's helper (monitor/compiled.py), made by torch
            for f in functions(value):
                yield f"{prefix}.{key}", f
            if _table(value):
                for k, entry in list(value.items()):
                    for f in functions(entry):
                        yield f"{prefix}.{key}[{getattr(k, '__qualname__', k)}]", f


def _foreign_objects(r: Route, trusted: tuple[str, ...]) -> list[str]:
    """Objects on torch's routes, neither code nor plain data, whose class runs Python
    code from outside installed code (a proxy put in place of
    ``Variable._execution_engine``: every backward runs through it, and it is no
    function).  C types (torch's engine, locks, pybind11 properties) run none."""
    out = []
    for ns in r.spaces:
        prefix = getattr(ns, "__qualname__", None) or getattr(ns, "__name__", "?")
        for key, value in list(vars(ns).items()):
            if isinstance(value, (type, types.ModuleType, types.FunctionType)):
                continue
            code = [
                origin(f)
                for cls in type(value).__mro__
                for v in list(vars(cls).values())
                for f in functions(v)
                # The standard library's frozen modules and dataclass-made methods.
                if not f.__code__.co_filename.startswith("<frozen ") and not _generated(f)
            ]
            outside = sorted({c for c in code if not c.startswith(trusted)})
            if outside:
                out.append(f"{prefix}.{key} = a {type(value).__qualname__} from {outside[0]}")
    return out


def digest(found: list[Route]) -> dict[str, str]:
    """A short digest per route for the run-start record (code bytes and object ids)."""
    out = {}
    for r in found:
        h = hashlib.blake2b(digest_size=8)
        for o in r.baseline:
            code = getattr(o, "co_code", None)
            h.update(
                code if isinstance(code, bytes) else f"{type(o).__qualname__}:{id(o)}".encode()
            )
        out[r.label] = h.hexdigest()
    return out
