"""HDF5 files: legacy Keras models (``.h5``) and Keras v3 weight files.

A legacy Keras HDF5 model keeps its architecture as JSON in the root
attribute ``model_config`` (and the compile settings in ``training_config``):
the same JSON, with the same Lambda layers and module references, as a
``.keras`` file's config.json.  We open the file with h5py (the optional
``trainguard[h5]`` extra) and read those attributes only, never a dataset.
Without h5py the file is a finding that says it was not inspected (TG208),
never "clean": whoever can load a Keras ``.h5`` has h5py, since Keras needs it.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, BinaryIO

from trainguard.errors import LimitExceeded, ScanError
from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.keras import check_config_bytes

MAGIC = b"\x89HDF\r\n\x1a\n"
# A user block in front of the superblock moves the signature to 512, 1024, ...
_SUPERBLOCK_OFFSETS = (0, 512, 1024, 2048)
_KERAS_ATTRIBUTES = ("model_config", "training_config")

# Runs in the isolated child (trainguard.scanner.isolated): opens the file with h5py
# and reads the named string attributes, refusing any stored larger than the cap
# before reading it.  Never a dataset.
_READ_ATTRIBUTES = """
import base64, json
path, cap, keys = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
try:
    import h5py
except ImportError:
    ready()
    print(json.dumps({"missing": "h5py"}))
    raise SystemExit(0)
ready()
try:
    f = h5py.File(path, "r")
except Exception as exc:
    print(json.dumps({"open_error": str(exc)[:300]}))
    raise SystemExit(0)
out = {}
with f:
    for key in keys:
        try:
            if key not in f.attrs:
                continue
            size = f.attrs.get_id(key).get_storage_size()
            if size > cap:
                out[key] = {"too_large": size}
                continue
            value = f.attrs[key]
            if hasattr(value, "tolist"):
                value = value.tolist()
                if isinstance(value, list) and len(value) == 1:
                    value = value[0]
            if isinstance(value, str):
                data = value.encode("utf-8")
            elif isinstance(value, bytes):
                data = value
            else:
                out[key] = {"error": "expected a string, found " + type(value).__name__}
                continue
            if len(data) > cap:
                out[key] = {"too_large": len(data)}
                continue
            out[key] = {"value": base64.b64encode(data).decode()}
        except Exception as exc:
            out[key] = {"error": str(exc)[:300]}
print(json.dumps({"attributes": out}))
"""


def _finding(rule_id: str, message: str, trigger: str = "") -> Finding:
    return finding(rule_id, message, trigger=trigger)


class Hdf5Format:
    name = "hdf5"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return any(head[o : o + 8] == MAGIC for o in _SUPERBLOCK_OFFSETS)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        # Imported here: only HDF5 files need a child process (registry.preload loads them).
        import importlib.util
        import tempfile

        from trainguard.scanner.isolated import DEFAULT_TIMEOUT, run_child

        if importlib.util.find_spec("h5py") is None:
            yield _finding(
                "TG208",
                "HDF5 file not inspected: install 'trainguard[h5]' (h5py) to check the "
                "Keras model config it may carry; until then treat it as unsafe",
                trigger="h5py missing",
            )
            return
        timeout = DEFAULT_TIMEOUT
        if ctx.deadline is not None:
            timeout = max(1.0, min(timeout, ctx.deadline - time.monotonic()))
        clamped = timeout < DEFAULT_TIMEOUT
        with blob.open() as raw, tempfile.TemporaryDirectory(prefix="tg-h5-") as tmp:
            try:
                path, fds = _on_disk(raw, blob, tmp, ctx.limits.max_in_memory_member)
            except LimitExceeded as exc:
                yield _finding("TG002", f"HDF5 nested in a compressed stream: {exc}")
                return
            cap = str(ctx.limits.max_model_config)
            result = run_child(
                _READ_ATTRIBUTES, [path, cap, *_KERAS_ATTRIBUTES], timeout=timeout, pass_fds=fds
            )
        if result.output is None and not result.ready:
            # The child failed before opening the file: this machine's problem, not the file's.
            raise ScanError(f"the isolated HDF5 parser could not run: {result.problem}")
        if result.output is None and result.timed_out and clamped:
            raise LimitExceeded(
                "time per file (the isolated HDF5 parser was still working)", timeout
            )
        if result.output is None:
            yield _finding(
                "TG004",
                f"libhdf5 {result.problem} reading this file (in trainguard's isolated "
                "parser): do not load it",
                trigger="libhdf5",
            )
            return
        if "missing" in result.output:
            yield _finding("TG208", "HDF5 file not inspected: h5py could not be imported")
            return
        if "open_error" in result.output:
            yield _finding("TG003", f"unreadable HDF5 file: {result.output['open_error']}")
            return
        yield from self._attributes(ctx, blob, result.output.get("attributes"))

    def _attributes(self, ctx: ScanContext, blob: Blob, found: Any) -> Iterator[Finding]:
        if not isinstance(found, dict):
            yield _finding("TG003", "the isolated HDF5 parser returned no attributes")
            return
        for key in _KERAS_ATTRIBUTES:
            item = found.get(key)
            if not isinstance(item, dict):
                continue
            if "too_large" in item:
                yield _finding(
                    "TG002",
                    f"attribute {key} exceeds the limit of {ctx.limits.max_model_config}",
                    trigger=key,
                )
                continue
            if "error" in item or not isinstance(item.get("value"), str):
                why = str(item.get("error", "no value"))
                yield _finding("TG003", f"attribute {key} unreadable: {why}", trigger=key)
                continue
            value = base64.b64decode(item["value"])
            if key == "model_config" and "keras-h5" not in ctx.formats_seen:
                ctx.formats_seen.append("keras-h5")
            for f in check_config_bytes(ctx, value, blob.name, f"attribute {key}"):
                yield f if f.trigger else replace(f, trigger=key)


def _on_disk(raw: BinaryIO, blob: Blob, tmp: str, cap: int) -> tuple[str, tuple[int, ...]]:
    """A path the child can open, and descriptors it must inherit for it.

    The top-level file is handed over as the descriptor this scan opened
    (``/dev/fd/N``), so a file swapped after it was sniffed is not what the child
    reads; a member is copied (bounded) into the scan's private temp folder.
    """
    name = getattr(raw, "name", None)
    if blob.depth == 0 and isinstance(name, str) and os.path.isfile(name):
        try:
            fd = raw.fileno()
        except (OSError, ValueError, AttributeError):
            fd = -1
        if fd >= 0 and os.path.isdir("/dev/fd"):
            return f"/dev/fd/{fd}", (fd,)
        return name, ()
    path = os.path.join(tmp, "member.h5")
    copied = 0
    with open(path, "wb") as out:
        while chunk := raw.read(1 << 20):
            copied += len(chunk)
            if copied > cap:
                raise LimitExceeded("copy of an HDF5 member", cap)
            out.write(chunk)
    return path, ()
