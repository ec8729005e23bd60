"""``trainguard.protect()``: make every model load in this process scan first.

Patches ``torch.load`` (and ``torch.serialization.load``), ``pickle.load`` /
``pickle.loads``, ``numpy.load`` (when pickles are allowed) and
``joblib.load``.  Each wrapper reads the bytes that carry code once, scans
them, refuses (``mode="block"``) or logs (``mode="warn"``) findings, and then
hands those same bytes to the original loader inside the sandbox.  Libraries
that call these functions through the module attribute (Hugging Face
transformers' Trainer, Accelerate, Lightning) are covered; code that bound the
original function before ``protect()`` ran (``from torch import load``) is not.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from trainguard.errors import UnsafeModelError, UsageError
from trainguard.findings import Finding, Severity
from trainguard.loader import sandbox
from trainguard.loader.zipcheck import check_torch_zip
from trainguard.scanner import Policy, registry, scan_bytes
from trainguard.scanner.engine import scan_pickle_bytes
from trainguard.scanner.picklevm.machine import PickleMachine
from trainguard.scanner.stream import ByteStream

log = logging.getLogger("trainguard")


@dataclass
class _Config:
    policy: Policy
    mode: str
    strict: bool
    originals: dict[tuple[Any, str], Any] = field(default_factory=dict)


_config: _Config | None = None
_lock = threading.Lock()
_reentry = threading.local()


def protect(
    policy: Policy | None = None,
    mode: str = "block",
    strict: bool = False,
    *,
    env_snapshot: str | os.PathLike[str] | None = None,
    env_key: Any = None,
    env_paths: list[str] | None = None,
) -> None:
    """Scan before every torch/pickle/numpy/joblib load in this process.

    ``mode="block"`` raises :class:`UnsafeModelError` for findings at or above
    high (medium too with ``strict``); ``mode="warn"`` logs them and loads
    anyway (the sandbox still blocks what the payload tries).  Calling it again
    updates the settings.  With ``env_snapshot`` (and the public ``env_key``
    that signed it), the Python environment is first checked against that
    sealed snapshot: an edited torch or an added ``.pth`` is refused before
    anything loads.
    """
    global _config
    if mode not in ("block", "warn"):
        raise UsageError(f"mode must be 'block' or 'warn', not {mode!r}")
    if env_snapshot is not None:
        _check_environment(os.fspath(env_snapshot), env_key, env_paths, mode)
    with _lock:
        if _config is not None:
            _config.policy, _config.mode, _config.strict = policy or Policy(), mode, strict
            return
        cfg = _Config(policy or Policy(), mode, strict)
        _patch(cfg, pickle, "load", _guard_pickle_load)
        _patch(cfg, pickle, "loads", _guard_pickle_loads)
        torch = sys.modules.get("torch") or _try_import("torch")
        if torch is not None:
            _warm_up_torch(torch)
            _patch(cfg, torch, "load", _guard_torch_load)
            _patch(cfg, torch.serialization, "load", _guard_torch_load)
        numpy = sys.modules.get("numpy") or _try_import("numpy")
        if numpy is not None:
            _patch(cfg, numpy, "load", _guard_numpy_load)
        joblib = sys.modules.get("joblib") or _try_import("joblib")
        if joblib is not None:
            _patch(cfg, joblib, "load", _guard_joblib_load)
            _patch(cfg, joblib.numpy_pickle, "load", _guard_joblib_load)
        # Guarded loads scan first; the sandbox around them refuses new imports,
        # so every format the scanner may need is imported now.
        registry.preload()
        sandbox.install()
        _config = cfg


def _check_environment(snapshot: str, key: Any, paths: list[str] | None, mode: str) -> None:
    from trainguard.env.verify import check_against

    bad = check_against(snapshot, key, paths)
    if not bad:
        return
    if mode == "block":
        raise UnsafeModelError("the Python environment", bad)
    for f in bad:
        log.warning("trainguard: environment: %s %s %s", f.file, f.rule, f.message)


def unprotect() -> None:
    """Restore every patched loader."""
    global _config
    with _lock:
        if _config is None:
            return
        for (owner, name), original in _config.originals.items():
            setattr(owner, name, original)
        _config = None


def is_protected() -> bool:
    return _config is not None


def _warm_up_torch(torch: Any) -> None:
    """Run torch.load once on a tiny tensor, outside the sandbox.

    Its first call imports and compiles helpers lazily; doing that now keeps
    the sandbox strict for real loads.
    """
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def _try_import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def _patch(cfg: _Config, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name)
    cfg.originals[(owner, name)] = original
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    wrapper.__trainguard_original__ = original
    setattr(owner, name, wrapper)


# -- decisions ----------------------------------------------------------------


def _decide(source: str, findings: list[Finding]) -> None:
    cfg = _config
    if cfg is None:
        return
    threshold = Severity.MEDIUM if cfg.strict else Severity.HIGH
    bad = [f for f in findings if f.severity >= threshold]
    for f in findings:
        if f.severity >= Severity.MEDIUM and f not in bad:
            log.warning("trainguard: %s: %s %s: %s", source, f.rule, f.severity, f.message)
    if not bad:
        _preimport(findings)
        return
    if cfg.mode == "block":
        raise UnsafeModelError(source, bad)
    for f in bad:
        log.warning(
            "trainguard: loading %s despite %s %s: %s", source, f.rule, f.severity, f.message
        )


def _preimport(findings: list[Finding]) -> None:
    """Import, outside the sandbox, the modules of globals the scan accepted.

    The original loader would import them anyway; doing it first lets the
    sandbox refuse every import the scan did not see.
    """
    for f in findings:
        if f.rule != "TG103" or not f.trigger:
            continue
        parts = f.trigger.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue


@contextmanager
def _guarded(source: str) -> Iterator[None]:
    """Run the original loader in the sandbox; turn refusals into UnsafeModelError."""
    _reentry.depth = getattr(_reentry, "depth", 0) + 1
    try:
        with sandbox.sandboxed() as blocked:
            try:
                yield
            except Exception as exc:
                if blocked:
                    raise UnsafeModelError(source, list(blocked)) from exc
                raise
            if blocked:  # the payload swallowed the refusal: still refuse the result
                raise UnsafeModelError(source, list(blocked))
    finally:
        _reentry.depth -= 1


def _nested() -> bool:
    # A guarded loader calling another guarded loader (torch.load -> pickle) is
    # already inside the sandbox with its bytes checked.
    return getattr(_reentry, "depth", 0) > 0


def _policy() -> Policy:
    return _config.policy if _config is not None else Policy()


# -- reading the bytes once ----------------------------------------------------


def _open(f: Any) -> tuple[BinaryIO, bool, str]:
    if isinstance(f, (str, os.PathLike)):
        return open(f, "rb"), True, os.fspath(f)
    return f, False, getattr(f, "name", "<file object>")


def _checked_copy(data: bytes, source: str) -> io.BytesIO:
    """``data`` as a file for the real loader, once the scan has let it through."""
    _decide(source, scan_bytes(data, source, policy=_policy()).findings)
    return io.BytesIO(data)


def _read_checked(f: Any) -> tuple[io.BytesIO, str]:
    """The whole of ``f`` (a path or an open file), scanned: see :func:`_checked_copy`."""
    handle, owned, source = _open(f)
    try:
        data = handle.read()
    finally:
        if owned:
            handle.close()
    return _checked_copy(data, source), source


class _Recorder(io.RawIOBase):
    """Keeps every byte read through it, so one pickle can be cut out of a stream."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.kept = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        buf[: len(data)] = data
        self.kept += data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        line = self.raw.readline(size if size is not None else -1)
        self.kept += line
        return line


def _read_one_pickle(f: BinaryIO) -> bytes:
    """Exactly the bytes of the next pickle in ``f`` (position ends after its STOP)."""
    rec = _Recorder(f)
    PickleMachine(ByteStream(rec)).run()  # type: ignore[arg-type]
    return bytes(rec.kept)


# -- the wrappers ------------------------------------------------------------------


def _guard_pickle_loads(original: Callable[..., Any]) -> Callable[..., Any]:
    def loads(data: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _nested():
            return original(data, *args, **kwargs)
        raw = bytes(data)
        _decide("<pickle bytes>", scan_pickle_bytes(raw, policy=_policy()))
        with _guarded("<pickle bytes>"):
            return original(raw, *args, **kwargs)

    return loads


def _guard_pickle_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(file: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _nested():
            return original(file, *args, **kwargs)
        source = getattr(file, "name", "<file object>")
        data = _read_one_pickle(file)
        _decide(str(source), scan_pickle_bytes(data, policy=_policy()))
        with _guarded(str(source)):
            return original(io.BytesIO(data), *args, **kwargs)

    return load


def _guard_torch_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if _nested():
            return original(f, *args, **kwargs)
        handle, owned, source = _open(f)
        try:
            start = handle.tell()
            head = handle.read(4)
            handle.seek(start)
            if head == b"PK\x03\x04":
                pinned = _check_torch_zip(handle, start, source)
                target: Any = f if kwargs.get("mmap") else pinned
            else:
                target = _checked_copy(handle.read(), source)
            with _guarded(source):
                return original(target, *args, **kwargs)
        finally:
            if owned:
                handle.close()

    return load


def _check_torch_zip(handle: BinaryIO, start: int, source: str) -> BinaryIO:
    """Scan a torch zip's pickles; return a file whose pickle bytes are the scanned ones."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell() - start
    window = _Window(handle, start, size)
    check = check_torch_zip(window, size, _policy())  # type: ignore[arg-type]
    _decide(source, check.findings)
    # Stored members (as torch writes them) are served from the scanned copy.
    pins = {e.data_offset: data for e, data in check.pickles.values() if e.method == 0}
    return _Pinned(window, pins)  # type: ignore[return-value]


class _Window(io.RawIOBase):
    """``handle`` seen from ``start`` (torch.load accepts a file positioned mid-way)."""

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        self.h, self.start, self.size, self.pos = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        self.h.seek(self.start + self.pos)
        n = self.h.readinto(buf)  # type: ignore[attr-defined]
        self.pos += n
        return int(n)


class _Pinned(_Window):
    """Serves the scanned pickle bytes from memory; everything else from the file."""

    def __init__(self, window: _Window, pins: dict[int, bytes]) -> None:
        super().__init__(window.h, window.start, window.size)
        self.pins = sorted(pins.items())

    def readinto(self, buf: Any) -> int:
        begin = self.pos
        n = super().readinto(buf)
        view = memoryview(buf).cast("B")
        for off, data in self.pins:
            lo, hi = max(off, begin), min(off + len(data), begin + n)
            if lo < hi:
                view[lo - begin : hi - begin] = data[lo - off : hi - off]
        return n


def _guard_numpy_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        allow_pickle = kwargs.get("allow_pickle", args[1] if len(args) > 1 else False)
        if _nested() or not allow_pickle:
            return original(file, *args, **kwargs)  # numpy without pickle runs no code
        copy, source = _read_checked(file)
        if kwargs.get("mmap_mode") is not None:
            kwargs["mmap_mode"] = None  # an in-memory copy cannot be mapped
        with _guarded(source):
            return original(copy, *args, **kwargs)

    return load


def _guard_joblib_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(filename: Any, *args: Any, **kwargs: Any) -> Any:
        if _nested():
            return original(filename, *args, **kwargs)
        copy, source = _read_checked(filename)
        kwargs.pop("mmap_mode", None)
        with _guarded(source):
            return original(copy, *args, **kwargs)

    return load
