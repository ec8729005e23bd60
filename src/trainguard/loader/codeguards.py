"""Guards for the loaders of models that carry code by design.

``torch.jit.load`` compiles and runs a TorchScript archive's ``code/``;
``torch.package.PackageImporter`` imports the archive's own Python modules;
``torch.export.load`` rebuilds an exported program (``.pt2``).  No
unpickler can make those safe, so each guard reads the archive once, checks
it against the trust policy, has the scanner judge the whole archive (what
its code can do), refuses at the refusal level, and hands the loader the
very bytes that were judged.  TorchScript the scanner finds benign loads as
before.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from trainguard.loader import state
from trainguard.loader.guards import read_checked


def _judged(f: Any) -> tuple[Any, str]:
    if isinstance(f, io.BytesIO) and state.nested():
        return f, "<nested>"  # torch.load already judged these bytes
    return read_checked(f)


def guard_jit_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        copy, _ = _judged(f)
        return original(copy, *args, **kwargs)

    return load


def guard_export_load(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        copy, _ = _judged(f)
        return original(copy, *args, **kwargs)

    return load


def guarded_package_importer(base: type[Any]) -> type[Any]:
    """``PackageImporter`` that judges its archive first and reads only the judged bytes."""

    def __init__(self: Any, file_or_buffer: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(file_or_buffer, (str, bytes)) or hasattr(file_or_buffer, "__fspath__"):
            copy, _ = read_checked(file_or_buffer)
        elif hasattr(file_or_buffer, "read"):
            copy, _ = read_checked(file_or_buffer)
        else:  # an already-open torch zip reader: its bytes are out of reach
            from trainguard.errors import UsageError

            raise UsageError("protect(): PackageImporter needs a path or a file, not a reader")
        base.__init__(self, copy, *args, **kwargs)

    def sandboxed(name: str) -> Callable[..., Any]:
        method = getattr(base, name)

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            # The archive's own modules run when these import them, long after
            # __init__ judged the bytes: they run inside the sandbox too.
            with state.guarded(f"<torch.package {name}>"):
                return method(self, *args, **kwargs)

        return run

    methods: dict[str, Any] = {"__init__": __init__, "__module__": base.__module__}
    for name in ("import_module", "load_pickle"):
        if hasattr(base, name):
            methods[name] = sandboxed(name)
    return type(base.__name__, (base,), methods)
