"""Severity by what a global does when the pickle calls it.

:func:`names.classify` judges a name; this module judges its uses.  A pickle
that merely constructs an ordinary class (NEWOBJ, or a class handed to
``copyreg._reconstructor``) builds an object; a pickle that *calls* a global
(REDUCE, INST, OBJ, NEWOBJ_EX) runs it with arguments of the attacker's choice.
An expression evaluator, a test helper that runs a script, a decoder that
unpickles its input: all are ordinary third-party functions, so a call on a
global not known to be safe fails the default level (TG112) unless the user's
policy allows it.

Some denied names are data in the shapes the standard library itself writes:
``getattr(SomeClass, "MEMBER")`` (enums by name), ``operator.getitem(typing.Union,
...)`` (``Optional[int]``), ``type(None)``.  Those exact shapes, and no other use
of the same import, lower the name to low.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainguard.findings import Severity
from trainguard.scanner.picklevm.machine import (
    Built,
    Call,
    DictV,
    Global,
    ListV,
    PersistentRef,
    PickleEvents,
    SetV,
    Value,
)
from trainguard.scanner.picklevm.names import (
    PURE_BUILTINS,
    STDLIB_DATA,
    GlobalVerdict,
    classify,
    normalise,
)

CALL_KINDS = frozenset(["reduce", "inst", "obj", "newobj_ex", "setstate"])
_CONTAINER_KINDS = frozenset(["setitem", "append", "additems"])
_CONSTRUCTORS = frozenset(["copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"])

# Third-party callables whose call rebuilds data, each read in its library's source:
# Cython extension types' __reduce__ (scikit-learn's trees and losses) and the enums
# transformers stores in TrainingArguments (called with their value).
KNOWN_SAFE_CALLS: frozenset[str] = frozenset(
    [
        "sklearn.tree._tree.Tree",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn._loss._loss.CyHalfSquaredError",
        "sklearn._loss._loss.CyHalfBinomialLoss",
        "sklearn._loss._loss.CyHalfMultinomialLoss",
        "sklearn._loss.link.Interval",
        "transformers.trainer_utils.IntervalStrategy",
        "transformers.trainer_utils.SaveStrategy",
        "transformers.trainer_utils.SchedulerType",
        "transformers.trainer_utils.HubStrategy",
        "transformers.training_args.OptimizerNames",
        "transformers.debug_utils.DebugOption",
        "accelerate.utils.dataclasses.DistributedType",
        # numpy < 1.0 arrays: ndarray.__new__(subtype, shape, dtype) (numpy/core/_internal.py)
        "numpy.core._internal._reconstruct",
        # numpy < 1.17 pickled RandomState as __RandomState_ctor() (numpy/random/__init__.py)
        "numpy.random.__RandomState_ctor",
        # re patterns and flags, namespaces: calls that rebuild a value
        "re._compile",
        "re.compile",
        "argparse.Namespace",
    ]
)

# Allowlisted rebuild helpers that call one of their arguments: the argument is
# called as surely as if the pickle had called it (position of the callee).
_CALL_THROUGH = {
    "torch._tensor._rebuild_from_type_v2": 0,
    "torch._tensor._rebuild_from_type": 0,
    "copy._reconstruct": 2,
}

# (class, attribute) pairs whose fetched attribute the standard library calls to
# rebuild an object: ZoneInfo pickles as getattr(ZoneInfo, "_unpickle")(key, 1).
KNOWN_RECONSTRUCTORS = frozenset([("zoneinfo.ZoneInfo", "_unpickle")])

_CONTAINER_TYPES = frozenset(
    f"builtins.{n}" for n in "list dict tuple set frozenset type int str float bool".split()
)
_WALK_BUDGET = 200_000


def qualname(g: Global) -> str:
    module, name = normalise(g.module, g.name)[0]
    return f"{module}.{name}"


@dataclass
class CallIndex:
    """Every call in one pickle, by the qualified name of the global it calls."""

    ev: PickleEvents
    allow: frozenset[str]

    def __post_init__(self) -> None:
        self.by_name: dict[str, list[Call]] = {}
        self.called: set[int] = set()  # id() of values that are themselves called
        self.mutated = {id(b.obj) for b in self.ev.builds}  # BUILD, SETITEM, APPEND targets
        for c in self.ev.calls:
            if c.kind in ("setitem", "append", "additems") and isinstance(c.args, tuple):
                self.mutated.add(id(c.args[0]) if c.args else 0)
            self.called.add(id(c.func))
            if not isinstance(c.func, Global):
                continue
            name = qualname(c.func)
            self.by_name.setdefault(name, []).append(c)
            if name == "copyreg._reconstructor":
                self._reconstructor_base(c)
            at = _CALL_THROUGH.get(name)
            if at is not None and isinstance(c.args, tuple) and len(c.args) > at:
                inner = c.args[at]
                self.called.add(id(inner))  # a computed callee (a getattr result) is called too
                for g in _callees(inner):
                    through = Call(g, c.args[at + 1 :], c.offset, "reduce")
                    self.by_name.setdefault(qualname(g), []).append(through)
        for c in self.ev.calls:
            target = c.args[0] if c.kind in _CONTAINER_KINDS and isinstance(c.args, tuple) else None
            cls = None if target is None else container_target_class(target)
            if cls is not None and not _torchscript(cls):
                method = Call(cls, c.args, c.offset, "setstate")
                self.by_name.setdefault(qualname(cls), []).append(method)
        for b in self.ev.builds:
            cls = _class_of(b.obj)
            custom = cls is not None and (
                not _default_state(b.state) or qualname(cls).startswith(UNPICKLING_STATE)
            )
            if cls is not None and custom and not _torchscript(cls):
                # Only a custom __setstate__ takes this state: BUILD calls it.
                setstate = Call(cls, (b.state,), b.offset, "setstate")
                self.by_name.setdefault(qualname(cls), []).append(setstate)
        self._elsewhere: set[str] | None = None

    def _reconstructor_base(self, c: Call) -> None:
        # _reconstructor(cls, base, state) runs base.__init__(obj, state) unless
        # base is object: as much a call of base as REDUCE would be.
        if isinstance(c.args, tuple) and len(c.args) == 3:
            self.called.add(id(c.args[1]))
        if isinstance(c.args, tuple) and len(c.args) == 3:
            for g in _callees(c.args[1]):
                if qualname(g) != "builtins.object":
                    through = Call(g, (c.args[2],), c.offset, "reduce")
                    self.by_name.setdefault(qualname(g), []).append(through)

    def referenced_elsewhere(self, name: str) -> bool:
        """True if the import is used other than as the callable of a call (or we cannot tell)."""
        if self._elsewhere is None:
            self._elsewhere = _non_call_references(self.ev)
        return name in self._elsewhere or "*" in self._elsewhere


def judge(g: Global, verdict: GlobalVerdict, index: CallIndex) -> tuple[GlobalVerdict, Call | None]:
    """The verdict on an import once its calls are known, and the call that decided it."""
    name = qualname(g)
    # INST/OBJ without arguments allocate a class but call a function: the
    # scanner cannot tell which the name is, so it counts as a call.
    calls = [c for c in index.by_name.get(name, []) if c.kind in CALL_KINDS]
    if not calls:
        return verdict, None
    if verdict.severity is not None and verdict.severity >= Severity.HIGH:
        if all(_data_shaped(name, c, index) for c in calls) and not index.referenced_elsewhere(
            name
        ):
            return GlobalVerdict(Severity.LOW, "TG103", f"{name} used only to rebuild data"), None
        return verdict, calls[0]
    if verdict.severity is None or safe_to_call(name):
        return verdict, calls[0]
    return (
        GlobalVerdict(
            Severity.HIGH,
            "TG112",
            f"calls {name} while loading; a call runs it with arguments the file chooses, "
            "and it is not known to be safe to call (allow it in a policy if you trust it)",
        ),
        calls[0],
    )


def _class_of(obj: Value) -> Global | None:
    """The imported class an object was constructed from, when the pickle says so."""
    if not (isinstance(obj, Call) and isinstance(obj.func, Global)):
        return None
    if qualname(obj.func) in _CONSTRUCTORS:
        args = obj.args
        first = args[0] if isinstance(args, tuple) and args else None
        return first if isinstance(first, Global) else None
    return obj.func


def _torchscript(cls: Global) -> bool:
    """A TorchScript class of the archive: its __setstate__ is the archive's code.

    No Python module is called ``__torch__``: only ``torch.jit.load`` resolves these
    names, to classes compiled from the archive's ``code/`` folder, whose every
    operator the TorchScript flavour judges.  Custom C++ classes
    (``__torch__.torch.classes.*``) are native code and stay calls.
    """
    name = qualname(cls)
    return name.startswith("__torch__.") and not name.startswith("__torch__.torch.classes.")


def _default_state(state: Value) -> bool:
    """A state object.__setstate__'s default handles: a dict, or (dict, slots dict)."""
    if state is None or isinstance(state, DictV):
        return True
    return (
        isinstance(state, tuple)
        and len(state) == 2
        and all(x is None or isinstance(x, DictV) for x in state)
    )


def safe_to_call(name: str) -> bool:
    """Callables whose call rebuilds a value and reaches nothing else."""
    if name in KNOWN_SAFE_CALLS or name in STDLIB_DATA or name in PURE_BUILTINS:
        return True
    # Cython's generated __pyx_unpickle_<Class>(type, checksum, state) checks the
    # checksum, then <Class>.__new__(type) and sets the state: a construction.
    return name.rpartition(".")[2].startswith("__pyx_unpickle_")


def _data_shaped(name: str, call: Call, index: CallIndex) -> bool:
    args = call.args
    if not isinstance(args, tuple):
        return False
    if name == "builtins.type":
        return len(args) == 1  # type(x) returns x's class; three arguments build one
    if name in _GENERATORS:
        # torch.Generator pickles as Generator(device), then BUILD with (seed,
        # offset, state tensor): restoring a random state is data (red team's F3).
        if call.kind == "setstate":
            return len(args) == 1 and _generator_state(args[0])
        return call.kind == "reduce" and len(args) == 1 and _device(args[0])
    if name in ("operator.getitem", "_operator.getitem"):
        return (
            len(args) == 2
            and isinstance(args[0], Global)
            and (qualname(args[0]) in STDLIB_DATA or qualname(args[0]) in _CONTAINER_TYPES)
        )
    if name == "builtins.getattr":
        if len(args) != 2 or not isinstance(args[0], Global) or not isinstance(args[1], str):
            return False
        owner, attr = qualname(args[0]), args[1]
        if classify(args[0].module, args[0].name, index.allow).severity not in (
            None,
            Severity.LOW,
            Severity.MEDIUM,
        ):
            return False
        if id(call) in index.mutated:  # BUILD or SETITEM on an existing object
            return False
        if id(call) in index.called:  # the fetched attribute is then called
            return (owner, attr) in KNOWN_RECONSTRUCTORS
        return attr.isidentifier() and not attr.startswith("_")
    return False


_GENERATORS = frozenset(["torch._C.Generator", "torch.Generator"])


def _device(v: Value) -> bool:
    """``"cpu"`` or ``torch.device("cuda", 0)``: a device named by constants."""
    if isinstance(v, str):
        return True
    return (
        isinstance(v, Call)
        and isinstance(v.func, Global)
        and qualname(v.func) == "torch.device"
        and isinstance(v.args, tuple)
        and all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in v.args)
    )


def _generator_state(state: Value) -> bool:
    """(initial seed, offset or None, a tensor torch rebuilt): what Generator.__setstate__ takes."""
    if not (isinstance(state, tuple) and len(state) == 3):
        return False
    seed, offset, tensor = state
    while isinstance(tensor, Built):
        tensor = tensor.obj
    return (
        isinstance(seed, int)
        and (offset is None or isinstance(offset, int))
        and isinstance(tensor, Call)
        and isinstance(tensor.func, Global)
        and qualname(tensor.func).startswith("torch._utils._rebuild_tensor")
    )


# Calls that return an object that already exists in the loading process (an
# attribute of a module or class, a logger from the shared registry): writing
# into their result changes that process-wide object.
_FETCHES = frozenset(["builtins.getattr", "logging.getLogger"])
# Calls whose result may be one of their arguments or something the process
# already holds: max([torch.nn.utils]) is the module itself (the red team's
# modswap_1 rewrote clip_grad_norm_ through it).  None of them constructs.
_PASSTHROUGH = PURE_BUILTINS | _FETCHES | {"torch.jit._pickle.restore_type_tag"}


def existing_object(v: Value) -> bool:
    """True for an imported object or one a call may hand back from the process.

    Only what the pickle provably built (its own containers, an instance of a
    class it constructed) is new; the result of a function that constructs
    nothing may be any object its arguments reach.
    """
    while isinstance(v, Built):
        v = v.obj
    if isinstance(v, Global):
        return True
    return isinstance(v, Call) and isinstance(v.func, Global) and qualname(v.func) in _PASSTHROUGH


# dict subclasses whose __setitem__ is dict's own (read in each library's source):
# SETITEMS on them fills data.  Lightning saves its hyperparameters this way.
DATA_CONTAINERS = frozenset(
    [
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.Counter",
        "collections.deque",
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
    ]
)


# Modules whose classes' __setstate__ unpickles its state (torch's datapipe
# serialization wrappers call pickle.loads or dill.loads on it): BUILD on them is
# a call whatever the state's shape (the red team's nested_1 passed a dict).
UNPICKLING_STATE = (
    "torch.utils.data.datapipes.",
    "torchdata.",
    "dill.",
    "cloudpickle.",
    "ray.cloudpickle.",
)


def _callees(v: Value, depth: int = 0) -> list[Global]:
    """The imported objects a helper may end up calling when it calls ``v``.

    A plain global is itself; what a function that constructs nothing returns
    (``max([joblib.memory.Memory])``) may be any global among its arguments.
    """
    while isinstance(v, Built):
        v = v.obj
    if isinstance(v, Global):
        return [v]
    if depth > 4:
        return []
    if isinstance(v, Call) and isinstance(v.func, Global) and qualname(v.func) in _PASSTHROUGH:
        return _callees(v.args, depth + 1)
    items: list[Value] = []
    if isinstance(v, tuple):
        items = list(v)
    elif isinstance(v, (ListV, SetV)):
        items = list(v.items)
    elif isinstance(v, DictV):
        items = [x for kv in v.items for x in kv]
    return [g for x in items[:64] for g in _callees(x, depth + 1)]


def container_target_class(target: Value) -> Global | None:
    """The class whose ``__setitem__``/``append``/``add`` a container opcode calls.

    SETITEM(S)/APPEND(S)/ADDITEMS on the pickle's own dict, list or set change
    data; on an instance of an imported class they call that class's method
    (fsspec's FSMap.__setitem__ writes a file: the red team's gadget_1).
    """
    while isinstance(target, Built):
        target = target.obj
    if isinstance(target, (DictV, ListV, SetV)) or existing_object(target):
        return None
    cls = _class_of(target)
    return None if cls is None or qualname(cls) in DATA_CONTAINERS else cls


def known_reconstructor(call: Call) -> bool:
    """``getattr(C, name)(...)`` where the pair is a standard rebuild (ZoneInfo._unpickle)."""
    f = call.func
    return (
        isinstance(f, Call)
        and isinstance(f.func, Global)
        and qualname(f.func) == "builtins.getattr"
        and isinstance(f.args, tuple)
        and len(f.args) == 2
        and isinstance(f.args[0], Global)
        and (qualname(f.args[0]), f.args[1]) in KNOWN_RECONSTRUCTORS
    )


def _non_call_references(ev: PickleEvents) -> set[str]:
    """Names of imports that appear as values (arguments, state, the result), not as callees."""
    found: set[str] = set()
    seen: set[int] = set()
    budget = [_WALK_BUDGET]
    roots: list[Value] = [ev.result]
    for c in ev.calls:
        roots.append(c.args)
        if not isinstance(c.func, Global):
            roots.append(c.func)
    for b in ev.builds:
        roots += [b.obj, b.state]
    for r in roots:
        for v in _walk(r, seen, budget):
            if isinstance(v, Global):
                found.add(qualname(v))
    if budget[0] <= 0:
        found.add("*")
    return found


def _walk(v: Value, seen: set[int], budget: list[int]) -> Iterator[Value]:
    stack = [v]
    while stack and budget[0] > 0:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        budget[0] -= 1
        yield x
        if isinstance(x, tuple):
            stack.extend(x)
        elif isinstance(x, (ListV, SetV)):
            stack.extend(x.items)
        elif isinstance(x, DictV):
            for k, val in x.items:
                stack += [k, val]
        elif isinstance(x, Call):
            stack.append(x.args)
            if not isinstance(x.func, Global):  # a Global as the callee is a call, not a value
                stack.append(x.func)
        elif isinstance(x, Built):
            stack += [x.obj, x.state]
        elif isinstance(x, PersistentRef):
            stack.append(x.pid)
