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

import io
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, BinaryIO

from trainguard.errors import LimitExceeded
from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scan.base import Blob, ScanContext
from trainguard.scan.formats.keras import check_config_bytes

MAGIC = b"\x89HDF\r\n\x1a\n"
# A user block in front of the superblock moves the signature to 512, 1024, ...
_SUPERBLOCK_OFFSETS = (0, 512, 1024, 2048)
_KERAS_ATTRIBUTES = ("model_config", "training_config")


def _finding(rule_id: str, message: str, trigger: str = "") -> Finding:
    return finding(rule_id, message, trigger=trigger)


class Hdf5Format:
    name = "hdf5"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return any(head[o : o + 8] == MAGIC for o in _SUPERBLOCK_OFFSETS)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        try:
            import h5py
        except ImportError:
            yield _finding(
                "TG208",
                "HDF5 file not inspected: install 'trainguard[h5]' (h5py) to check the "
                "Keras model config it may carry; until then treat it as unsafe",
                trigger="h5py missing",
            )
            return
        with blob.open() as raw:
            try:
                f = _seekable(raw, ctx.limits.max_in_memory_member)
            except LimitExceeded as exc:
                yield _finding("TG002", f"HDF5 nested in a compressed stream: {exc}")
                return
            try:
                h5 = h5py.File(f, "r")
            except Exception as exc:  # libhdf5 reports damage through many exception types
                yield _finding("TG003", f"unreadable HDF5 file: {exc}")
                return
            with h5:
                yield from self._attributes(ctx, blob, h5)

    def _attributes(self, ctx: ScanContext, blob: Blob, h5: Any) -> Iterator[Finding]:
        for key in _KERAS_ATTRIBUTES:
            try:
                if key not in h5.attrs:
                    continue
                value = _read_text_attribute(h5.attrs, key, ctx.limits.max_model_config)
            except LimitExceeded as exc:
                yield _finding("TG002", f"attribute {key}: {exc}", trigger=key)
                continue
            except Exception as exc:  # a damaged attribute must not hide the other one
                yield _finding("TG003", f"attribute {key} unreadable: {exc}", trigger=key)
                continue
            if key == "model_config" and "keras-h5" not in ctx.formats_seen:
                ctx.formats_seen.append("keras-h5")
            for f in check_config_bytes(ctx, value, blob.name, f"attribute {key}"):
                yield f if f.trigger else replace(f, trigger=key)


def _read_text_attribute(attrs: Any, key: str, cap: int) -> bytes:
    """One string attribute as bytes, refusing fixed-size values past ``cap`` unread."""
    attr_id = attrs.get_id(key)
    if attr_id.get_storage_size() > cap:
        raise LimitExceeded(f"attribute {key}", cap)
    value = attrs[key]
    if hasattr(value, "tolist"):  # a 0-d or 1-element numpy array
        value = value.tolist()
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
    if isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, bytes):
        data = value
    else:
        raise ValueError(f"expected a string, found {type(value).__name__}")
    if len(data) > cap:
        raise LimitExceeded(f"attribute {key}", cap)
    return data


def _seekable(f: BinaryIO, cap: int) -> BinaryIO:
    """``f`` if it seeks (files, stored zip members), else a bounded in-memory copy."""
    try:
        if f.seekable():
            return f
    except (OSError, ValueError):
        pass
    data = f.read(cap + 1)
    if len(data) > cap:
        raise LimitExceeded("in-memory copy of an HDF5 member", cap)
    return io.BytesIO(data)
