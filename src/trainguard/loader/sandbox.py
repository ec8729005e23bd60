"""A sandbox for the duration of a guarded load, built on Python audit hooks.

Defence in depth behind the scanner: while a load guarded by ``protect()``
runs, this thread may not start processes, run or compile new code, import a
module that is not already loaded (the loader's own packages excepted), open
network connections, write, delete or rename files, load native libraries, or
let the unpickler import a global the scanner rates high or critical.  Each
refusal is recorded and raised to the caller as an :class:`UnsafeModelError`.

What audit hooks cannot stop (see docs/load.md): native code already loaded
that makes system calls directly; in-place changes to objects in memory (the
Sleepy Pickle technique edits weights with ordinary Python operations, which
the scanner catches, not the sandbox); other threads, which are not
restricted; and code that already runs and is determined to escape (hooks are
a tripwire for Python-level actions, not an OS-level boundary).
"""

from __future__ import annotations

import ast
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainguard.findings import Finding
from trainguard.loader.vetted import DENIED_BUT_VETTED
from trainguard.rules import finding
from trainguard.scanner.picklevm.names import classify

_PROCESS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
)
_FILES = (
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.utime",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.move",
)
_NETWORK = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")
_CODE = ("exec", "compile", "code.__new__", "marshal.loads", "function.__new__")
# exec/compile/marshal.loads are also how the import system runs an allowed
# module, how typing resolves forward references (torch.load does on first
# use) and how ast.literal_eval (numpy's header parser) reads a literal.
_TRUSTED_CALLERS = ("importlib._bootstrap", "importlib._bootstrap_external", "typing")
_NATIVE = ("ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata")
# Packages a loader itself may import lazily the first time it runs.
LOADER_PACKAGES = frozenset(
    [
        "torch",
        "numpy",
        "joblib",
        "pickle",
        "_pickle",
        "copyreg",
        "encodings",
        "zipfile",
        "gzip",
        "bz2",
        "lzma",
        "zlib",
    ]
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class _State(threading.local):
    def __init__(self) -> None:
        self.active = False
        self.blocked: list[Finding] = []


_state = _State()
_installed = False
_install_lock = threading.Lock()


class SandboxViolation(PermissionError):
    """Raised inside the loader when the sandbox refuses an action."""


def _refuse(event: str, detail: str) -> None:
    _state.blocked.append(finding("TG403", f"blocked {event} during load: {detail}", trigger=event))
    _state.active = False  # raising below may run more hooked code; do not recurse
    try:
        raise SandboxViolation(f"trainguard sandbox blocked {event}: {detail}")
    finally:
        _state.active = True


def _is_write_open(args: tuple[Any, ...]) -> bool:
    mode = args[1] if len(args) > 1 else None
    flags = args[2] if len(args) > 2 else 0
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _state.active:
        return
    if event.startswith(_PROCESS) or event in _NETWORK or event.startswith(_NATIVE):
        _refuse(event, repr(args)[:200])
    elif event in _CODE:
        if not _called_from_trusted_machinery():
            _refuse(event, repr(args)[:120])
    elif event.startswith(_FILES):
        _refuse(event, repr(args)[:120])
    elif event == "open" and _is_write_open(args):
        _refuse(event, f"write to {args[0]!r}")
    elif event == "import":
        name = str(args[0])
        if name not in sys.modules and name.split(".")[0] not in LOADER_PACKAGES:
            _refuse(event, name)
    elif event == "pickle.find_class":
        module, name = str(args[0]), str(args[1])
        if f"{module}.{name}" in DENIED_BUT_VETTED:
            return  # the restricted unpickler's vetted rebuild decides (torch.Generator)
        verdict = classify(module, name)
        if verdict.severity is not None and verdict.severity >= 3:
            _refuse(event, f"{module}.{name}")


def _called_from_trusted_machinery() -> bool:
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        code = frame.f_code
        if code is _LITERAL_EVAL or frame.f_globals.get("__name__") in _TRUSTED_CALLERS:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


_LITERAL_EVAL = ast.literal_eval.__code__


def install() -> None:
    """Install the audit hook once per process (hooks cannot be removed)."""
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True


@contextmanager
def sandboxed() -> Iterator[list[Finding]]:
    """Restrict this thread while the block runs; yields the list of refusals."""
    install()
    outer_active, outer_blocked = _state.active, _state.blocked
    _state.active, _state.blocked = True, []
    try:
        yield _state.blocked
    finally:
        _state.active, _state.blocked = outer_active, outer_blocked


@contextmanager
def suspended() -> Iterator[None]:
    """Lift this thread's restrictions for an import the user's policy vouches for."""
    was = _state.active
    _state.active = False
    try:
        yield
    finally:
        _state.active = was
