"""The unpickler ``protect()`` hands to every loader it guards.

A real unpickler does whatever the file says: it imports any global and calls
it with arguments from the file.  This one keeps pickle's data model (so
honest checkpoints of models, optimizers, configs and estimators come back
the same) and changes who decides what runs:

- **Calls** (``REDUCE``, old-style ``INST``/``OBJ`` with arguments) go only to
  trainguard's vetted table (:mod:`trainguard.loader.vetted`: containers,
  numpy's and torch's rebuilds with their arguments checked), to enum
  look-ups, and to what the user's policy allows (``[allow] globals``).
- **Instances** of any other importable class may be created the way pickle
  does without calling the class (``NEWOBJ``, ``copyreg._reconstructor``),
  only when the class's ``__new__`` is ``object``'s or a builtin container's,
  and then get their state (``BUILD``).  State is never applied to an object
  the file did not create that way (a tensor, whose ``__setstate__`` swaps its
  storage and installs backward hooks).
- A class handed out for construction is a stand-in that cannot be called;
  one left in the result as a value (a hook, a factory, anything that code may
  call later) refuses the load, as does an object created from the file that
  carries hooks.
- Denied globals are refused whatever the policy says.

Each refusal is an :class:`UnsafeModelError` whose message names the policy
line that would allow the global.
"""

from __future__ import annotations

import _compat_pickle
import collections
import enum
import importlib
import io
import pickle
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from trainguard.errors import UnsafeModelError
from trainguard.loader import sandbox, vetted
from trainguard.loader.tensors import refuse
from trainguard.scanner.picklevm.calls import KNOWN_SAFE_CALLS, UNPICKLING_STATE
from trainguard.scanner.picklevm.names import DENIED_MODULES, DENIED_NAMES, _in_module_set

# Classes whose ``__new__`` only allocates: creating one runs no code of the class.
_PLAIN_NEW = frozenset(
    id(t.__new__) for t in (object, dict, list, set, frozenset, tuple, int, float, str, bytes)
)
PYX = "__pyx_unpickle_"  # Cython's generated "create without __init__, then set state"
# Classes a checkpoint may hold as values (types of fields, not callables to run).
_VALUE_MODULES = ("typing", "builtins")


def policy_line(qualified: str) -> str:
    """The policy-file lines that allow ``qualified`` (shown in every refusal)."""
    return f'[allow]\nglobals = ["{qualified}"]'


def refuse_global(qualified: str, why: str, source: str) -> UnsafeModelError:
    hint = policy_line(qualified).replace("\n", " ")
    message = f"{qualified}: {why}; if you trust it, add to your policy file: {hint}"
    return refuse("TG401", message, source, qualified)


class ClassRef:
    """A class the file may instantiate (``NEWOBJ``) but never call."""

    __slots__ = ("cls", "name")

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name = cls, name

    def __repr__(self) -> str:
        return f"<class {self.name} (construct only)>"


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _numpy_ufunc(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__ == "ufunc" and kind.__module__ == "numpy"


def _plain_new(cls: type) -> bool:
    new = getattr(cls, "__new__", None)
    if id(new) in _PLAIN_NEW:
        return True
    # namedtuple's generated __new__ only packs its fields into a tuple.
    globs = getattr(new, "__globals__", {})
    return issubclass(cls, tuple) and str(globs.get("__name__", "")).startswith("namedtuple_")


class Restrictions:
    """The rules, mixed into ``pickle._Unpickler`` (and joblib's subclass of it)."""

    allow: ClassVar[frozenset[str]] = frozenset()
    source: ClassVar[str] = ""
    stack: list[Any]
    proto: int
    fix_imports: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup()

    def allowed(self) -> frozenset[str]:
        """The policy's allowed globals (joblib's subclass reads protect()'s, at each load)."""
        return self.allow

    def _setup(self) -> None:
        self._allow = self.allowed()
        self._callable: dict[int, Any] = {}  # id -> object, kept alive so ids stay unique
        self._created: dict[int, Any] = {}  # objects this load made with NEWOBJ
        self._trusted: set[str] = set()
        self._ours = vetted.table(self)

    def _trust(self, obj: Any) -> Any:
        self._callable[id(obj)] = obj
        return obj

    def mark_created(self, obj: Any) -> Any:
        self._created[id(obj)] = obj
        return obj

    def find_class(self, module: str, name: str) -> Any:
        sys.audit("pickle.find_class", module, name)
        if self.proto < 3 and self.fix_imports:
            mapped = _compat_pickle.NAME_MAPPING.get((module, name))
            if mapped:
                module, name = mapped
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in vetted.VALUE_NAMES and qualified in self._ours:
            return self._ours[qualified]
        if qualified in self._ours:
            return self._trust(self._ours[qualified])
        if qualified in DENIED_NAMES or _in_module_set(qualified, DENIED_MODULES):
            raise refuse("TG401", f"{qualified} is denied", self.source, qualified)
        if qualified in self._allow or _in_module_set(qualified, self._allow):
            # The policy trusts this global's author: its module may import freely.
            with sandbox.suspended():
                obj = self._resolve(module, name, qualified)
            self._trusted.add(qualified)
            return self._trust(obj)
        obj = self._resolve(module, name, qualified)
        if name.startswith(PYX) and callable(obj):
            return self._trust(vetted.cython_rebuild(obj, module, name[len(PYX) :], self))
        if _numpy_ufunc(obj) and module.partition(".")[0] == "numpy":
            # A ufunc as a value (FunctionTransformer(np.log1p)): pure arithmetic when
            # the user's code calls it later.  It is not trusted, so the file cannot
            # call it while loading (positional `out=` arguments write in place).
            return obj
        if not isinstance(obj, type):
            raise refuse_global(qualified, "a callable outside the allowlist", self.source)
        if module in _VALUE_MODULES or issubclass(obj, enum.Enum):
            return obj  # a type used as a value (typing.Any), or an enum to look up
        return ClassRef(obj, qualified)

    def _resolve(self, module: str, name: str, qualified: str) -> Any:
        try:
            obj: Any = importlib.import_module(module)
            for i, part in enumerate(name.split(".")):
                # Dunder attributes reach everything (__subclasses__, __globals__);
                # Cython's module-level __pyx_unpickle_X are checked in vetted.
                if part.startswith("__") and not (i == 0 and part.startswith(PYX)):
                    raise AttributeError(part)
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise refuse("TG401", f"{qualified} cannot be resolved: {exc}", self.source) from exc
        return obj

    # -- the opcodes that run code ---------------------------------------------

    def load(self) -> Any:
        return self.check_result(super().load())  # type: ignore[misc]

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ (protocol 0/1)
        made = self.call(klass, args) if args or not isinstance(klass, ClassRef) else None
        self.stack.append(made if made is not None else self.new(klass, (), {}))

    def call(self, func: Any, args: Any, kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, ClassRef) and func.name in KNOWN_SAFE_CALLS:
            # The scanner's table of classes whose call only rebuilds a value (each
            # read in its library's source: scikit-learn's Cython trees and losses):
            # one definition, so that scan and protect() cannot disagree on them.
            return self.mark_created(func.cls(*args, **kwargs))
        if isinstance(func, ClassRef):
            raise refuse_global(func.name, "calling this class runs its code", self.source)
        if id(func) in self._callable:
            result = func(*args, **kwargs)
            if isinstance(func, type) or getattr(func, "__trainguard_buildable__", False):
                self.mark_created(result)
            return result
        if isinstance(func, type) and issubclass(func, enum.Enum) and len(args) == 1:
            return func(*args)  # a member look-up by value
        what = getattr(func, "__qualname__", type(func).__name__)
        raise refuse("TG401", f"call of {what!r:.80}, an object from the file", self.source)

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(cls, ClassRef):
            if not _plain_new(cls.cls):
                raise refuse_global(cls.name, "its __new__ runs code", self.source)
            if getattr(cls.cls, "__del__", None) is not None:
                # A finalizer runs the class's code on the file's state at garbage
                # collection, no call needed (tempfile's closer unlinks its .name).
                raise refuse_global(cls.name, "it has a finalizer (__del__)", self.source)
            real = cls.cls
        elif id(cls) in self._callable and isinstance(cls, type):
            real = cls
        else:
            raise refuse("TG401", f"NEWOBJ on {cls!r:.80}", self.source)
        return self.mark_created(real.__new__(real, *args, **kwargs))

    def check_build(self) -> None:
        inst = self.stack[-2]
        if id(inst) not in self._created or _is_tensor(inst):
            raise refuse(
                "TG401",
                f"state applied to {type(inst).__name__}, not an object this file made",
                self.source,
            )
        cls = type(inst)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if f"{cls.__module__}.".startswith(UNPICKLING_STATE) and name not in self._allow:
            # Its __setstate__ unpickles the state (torch's datapipe wrappers): the
            # scanner's table of such modules, so both judge them alike.
            raise refuse_global(name, "its __setstate__ unpickles the state", self.source)

    def check_container(self, target: Any, methods: tuple[str, ...], opcode: str) -> None:
        """SETITEM(S)/APPEND(S)/ADDITEMS call the target's own methods: only builtin ones run.

        On a dict, list, set or deque (or OrderedDict's, which only keeps order) they
        change data; on any other class they call its code (fsspec's
        FSMap.__setitem__ writes a file), unless the policy allows the class.
        """
        cls = type(target)
        if all(getattr(cls, m, None) in _BUILTIN_METHODS for m in methods):
            return
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in self._allow or cls.__module__ in self._allow:
            return
        raise refuse_global(name, f"{opcode} on it calls its {methods[0]}", self.source)

    def check_result(self, result: Any) -> Any:
        """Refuse stand-ins left as values and hooks on objects from the file."""
        seen: set[int] = set()
        todo = [result]
        while todo:
            obj = todo.pop()
            if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
                continue
            seen.add(id(obj))
            if _is_tensor(obj) and getattr(obj, "_backward_hooks", None):
                raise refuse("TG401", "a tensor carries backward hooks from the file", self.source)
            if isinstance(obj, ClassRef):
                raise refuse_global(
                    obj.name, "a class kept as a value (code may call it later)", self.source
                )
            if isinstance(obj, dict):
                todo += [*obj.keys(), *obj.values()]
                todo.append(getattr(obj, "default_factory", None))
            elif isinstance(obj, (list, tuple, set, frozenset)):
                todo += list(obj)
            if id(obj) in self._created:
                state = getattr(obj, "__dict__", None)
                if isinstance(state, dict):
                    self._check_hooks(obj, state)
                    todo += list(state.values())
            elif getattr(getattr(obj, "dtype", None), "hasobject", False):
                todo += list(obj.flat)
        return result

    def _check_hooks(self, obj: Any, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if "hook" not in str(key) or not value:
                continue
            held = value.values() if isinstance(value, dict) else value
            cls = type(obj)
            for item in held if isinstance(held, (list, tuple, type({}.values()))) else [held]:
                if f"{type(item).__module__}.{type(item).__qualname__}" not in self._trusted:
                    raise refuse(
                        "TG401",
                        f"{cls.__module__}.{cls.__qualname__}.{key} holds {type(item).__name__!r}"
                        " from the file (code that would run later)",
                        self.source,
                    )


def _dispatch(base: dict[int, Callable[[Any], None]]) -> dict[int, Callable[[Any], None]]:
    """``base`` with the opcodes that run code routed through :class:`Restrictions`."""
    table = dict(base)
    build = base[pickle.BUILD[0]]

    def load_reduce(self: Any) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)

    def load_newobj(self: Any) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.new(self.stack[-1], args, {})

    def load_newobj_ex(self: Any) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self.new(self.stack[-1], args, kwargs)

    def load_build(self: Any) -> None:
        self.check_build()
        build(self)

    for code, methods, below in _CONTAINER_OPS:
        table[code[0]] = _container_op(base[code[0]], methods, below, code)

    table[pickle.REDUCE[0]] = load_reduce
    table[pickle.NEWOBJ[0]] = load_newobj
    table[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    table[pickle.BUILD[0]] = load_build
    return table


# opcode, the target's methods it calls, where the target is (stack depth, or
# None: just below the mark).
_CONTAINER_OPS: tuple[tuple[bytes, tuple[str, ...], int | None], ...] = (
    (pickle.SETITEM, ("__setitem__",), 3),
    (pickle.SETITEMS, ("__setitem__",), None),
    (pickle.APPEND, ("append",), 2),
    (pickle.APPENDS, ("extend", "append"), None),
    (pickle.ADDITEMS, ("add", "update"), None),
)
_BUILTIN_METHODS = frozenset(
    [
        dict.__setitem__,
        list.append,
        list.extend,
        set.add,
        set.update,
        collections.OrderedDict.__setitem__,
        collections.deque.append,
        collections.deque.extend,
    ]
)


def _container_op(
    handler: Callable[[Any], None], methods: tuple[str, ...], below: int | None, code: bytes
) -> Callable[[Any], None]:
    opcode = pickle._Unpickler.dispatch[code[0]].__name__.removeprefix("load_").upper()

    def op(self: Any) -> None:
        stack = self.stack if below is not None else self.metastack[-1]
        if stack:
            self.check_container(stack[-(below or 1)], methods, opcode)
        handler(self)

    return op


class RestrictedUnpickler(Restrictions, pickle._Unpickler):
    dispatch = _dispatch(pickle._Unpickler.dispatch)


def restricted_subclass(base: type[Any]) -> type[Any]:
    """``base`` (a ``pickle._Unpickler`` subclass, such as joblib's) under these rules."""
    return type(base.__name__, (Restrictions, base), {"dispatch": _dispatch(base.dispatch)})


def unpickler_for(allow: frozenset[str], source: str) -> type[RestrictedUnpickler]:
    """A subclass carrying the policy (torch subclasses what ``pickle_module`` gives)."""
    return type("Unpickler", (RestrictedUnpickler,), {"allow": allow, "source": source})


class PickleModule:
    """What ``torch.load(pickle_module=...)`` and nested ``pickle.load`` calls use."""

    __name__ = "trainguard.loader.restricted"

    def __init__(self, allow: frozenset[str], source: str) -> None:
        self.Unpickler = unpickler_for(allow, source)

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()

    def loads(self, data: Any, /, **kwargs: Any) -> Any:
        return self.load(io.BytesIO(bytes(data)), **kwargs)
