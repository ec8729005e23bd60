"""The wrappers ``protect()`` puts around torch, pickle, numpy and joblib loaders.

Each reads the bytes once, checks them against the trust policy (if any),
scans them, and then unpickles those same bytes with trainguard's restricted
unpickler (:mod:`trainguard.loader.restricted`), inside the sandbox.  The
file's own pickle code never runs unless the user chose ``unpickler="real"``.
``torch.load(weights_only=True)`` keeps torch's own weights-only unpickler,
which is stricter still.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from trainguard.errors import UnsafeModelError
from trainguard.loader import state, trust
from trainguard.loader.byteio import (
    Pinned,
    Window,
    backing_path,
    open_source,
    read_one_pickle,
    whole_file,
)
from trainguard.loader.zipcheck import check_torch_zip
from trainguard.scanner import scan_bytes
from trainguard.scanner.engine import scan_pickle_bytes

log = logging.getLogger("trainguard")

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def check_trust(data: bytes, source: str, path: str | None) -> None:
    """Refuse (or, in warn mode, log) bytes that no trusted seal covers."""
    cfg = state.config
    if cfg is None or cfg.trust is None:
        return
    try:
        if path is None:
            trust.check_in_memory(cfg.trust, source)
        else:
            trust.check_bytes(cfg.trust, path, data)
    except UnsafeModelError as exc:
        if cfg.mode == "block":
            raise
        for f in exc.findings:
            log.warning("trainguard: loading %s despite %s: %s", source, f.rule, f.message)


def checked_copy(data: bytes, source: str) -> io.BytesIO:
    """``data`` as a file for the loader, once the scan has let it through."""
    state.decide(source, scan_bytes(data, source, policy=state.policy()).findings)
    return io.BytesIO(data)


def read_checked(f: Any) -> tuple[io.BytesIO, str]:
    """The whole of ``f`` (a path or an open file), trusted and scanned."""
    handle, owned, source = open_source(f)
    try:
        data = handle.read()
    finally:
        if owned:
            handle.close()
    check_trust(data, source, backing_path(f))
    return checked_copy(data, source), source


# -- pickle --------------------------------------------------------------------------


def guard_pickle_loads(original: Callable[..., Any]) -> Callable[..., Any]:
    def loads(data: Any, /, **kwargs: Any) -> Any:
        raw = bytes(data)
        if state.nested():
            return _unpickle(original, raw, "<pickle bytes>", kwargs)
        check_trust(raw, "<pickle bytes>", None)
        state.decide("<pickle bytes>", scan_pickle_bytes(raw, policy=state.policy()))
        with state.guarded("<pickle bytes>"):
            return _unpickle(original, raw, "<pickle bytes>", kwargs)

    return loads


def _unpickle(original: Callable[..., Any], raw: bytes, source: str, kwargs: Any) -> Any:
    if state.real_unpickler():
        return original(raw, **kwargs)
    return state.pickle_module(source).loads(raw, **kwargs)


def guard_pickle_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(file: Any, /, **kwargs: Any) -> Any:
        source = str(getattr(file, "name", "<file object>"))
        if state.nested():
            if state.real_unpickler():
                return original(file, **kwargs)
            return state.pickle_module(source).load(file, **kwargs)
        path = backing_path(file)
        if path is not None and state.config is not None and state.config.trust is not None:
            # The seal covers the whole file: check all of it, then cut the
            # pickle out of those very bytes, never a second read.
            start, whole = file.tell(), whole_file(file)
            check_trust(whole, source, path)
            data = read_one_pickle(io.BytesIO(whole[start:]))
            file.seek(start + len(data))
        else:
            data = read_one_pickle(file)
            check_trust(data, source, path)
        state.decide(source, scan_pickle_bytes(data, policy=state.policy()))
        with state.guarded(source):
            if state.real_unpickler():
                return original(io.BytesIO(data), **kwargs)
            return state.pickle_module(source).load(io.BytesIO(data), **kwargs)

    return load


# -- torch ---------------------------------------------------------------------------

_TORCH_POSITIONAL = ("map_location", "pickle_module")


def guard_torch_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(_TORCH_POSITIONAL, args, strict=False))
        path = backing_path(f)
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".safetensors"):
            # torch.load hands these to safetensors, which runs no code.
            if state.config is not None and state.config.trust is not None:
                read_checked(f)
            return original(f, **kwargs)
        handle, owned, source = open_source(f)
        try:
            if state.nested():
                return original(handle, **_unpickling(kwargs, source))
            reader: BinaryIO = handle
            if state.config is not None and state.config.trust is not None:
                data = handle.read()
                check_trust(data, source, path)
                reader, kwargs["mmap"] = io.BytesIO(data), False
            return _torch_load(original, f, reader, source, kwargs)
        finally:
            if owned:
                handle.close()

    return load


def _torch_load(
    original: Callable[..., Any], f: Any, handle: BinaryIO, source: str, kwargs: dict[str, Any]
) -> Any:
    start = handle.tell()
    head = handle.read(4)
    handle.seek(start)
    if head != b"PK\x03\x04":
        target: Any = checked_copy(handle.read(), source)
    else:
        handle.seek(0, io.SEEK_END)
        window = Window(handle, start, handle.tell() - start)
        check = check_torch_zip(window, window.size, state.policy())  # type: ignore[arg-type]
        if any(name.endswith("constants.pkl") for name in check.pickles):
            # TorchScript: torch.load hands it to torch.jit.load, which runs its code;
            # the whole archive is judged, as torch.jit.load's guard does.
            window.seek(0)
            target = checked_copy(window.read(), source)
        else:
            state.decide(source, check.findings)
            # Stored members (as torch writes them) are served from the scanned copy.
            pins = {e.data_offset: d for e, d in check.pickles.values() if e.method == 0}
            target = f if kwargs.get("mmap") else Pinned(window, pins)
    with state.guarded(source):
        return original(target, **_unpickling(kwargs, source))


def _unpickling(kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """torch.load's arguments with trainguard's unpickler, unless torch's weights-only one runs."""
    if state.real_unpickler():
        return kwargs
    weights_only = kwargs.get("weights_only")
    forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in (
        "1",
        "y",
        "yes",
        "true",
    )
    if weights_only is None and kwargs.get("pickle_module") is None:
        no = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower()
        weights_only = no not in ("1", "y", "yes", "true")
    if weights_only or forced:
        return kwargs  # torch's own allowlist unpickler: already no code from the file
    return {**kwargs, "pickle_module": state.pickle_module(source), "weights_only": False}


def _env_flag(name: str) -> bool:
    # torch reads these the same way (torch.serialization.load)
    return os.environ.get(name, "0").lower() in ("1", "y", "yes", "true")


# -- numpy and joblib ------------------------------------------------------------------


def guard_numpy_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        allow_pickle = kwargs.get("allow_pickle", args[1] if len(args) > 1 else False)
        if state.nested() or not allow_pickle:
            # Without pickles numpy runs no code; nested, its pickle.load is ours.
            if state.config is not None and state.config.trust is not None:
                copy, _ = read_checked(file)
                return original(copy, *args, **kwargs)
            return original(file, *args, **kwargs)
        copy, source = read_checked(file)
        if kwargs.get("mmap_mode") is not None:
            kwargs["mmap_mode"] = None  # an in-memory copy cannot be mapped
        with state.guarded(source):
            return original(copy, *args, **kwargs)

    return load


def guard_joblib_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(filename: Any, *args: Any, **kwargs: Any) -> Any:
        if state.nested():
            return original(filename, *args, **kwargs)
        copy, source = read_checked(filename)
        kwargs.pop("mmap_mode", None)
        with state.guarded(source):
            return original(copy, *args, **kwargs)

    return load


def joblib_unpickler(base: type[Any]) -> type[Any]:
    """joblib's ``NumpyUnpickler`` under trainguard's rules (policy read at each load)."""
    from trainguard.loader.restricted import restricted_subclass

    made = restricted_subclass(base)

    def allowed(self: Any) -> frozenset[str]:
        return state.policy().allow_globals

    made.allowed = allowed
    made.source = "joblib"
    return made
