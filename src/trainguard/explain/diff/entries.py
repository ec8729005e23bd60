"""What a diff compares: tensor and value entries, the walk that finds them, their types.

A tensor entry is read on demand from its source (see :mod:`.sources`); a value
entry keeps a capped text for display and a digest of the whole value for
equality; a container entry keeps its kind and its keys' types, and every entry
its typed key path, so that nothing that loads differently compares equal.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainguard.errors import ScanError, UsageError

MAX_DEPTH = 64
MAX_VALUE_TEXT = 2_000  # characters of a non-tensor value kept for display
ROOT = "(root)"  # the name of the checkpoint's top-level container in a diff
Trail = tuple[tuple[str, str], ...]
CHUNK = 1 << 20  # elements per chunk: ~50 MB of float64 temporaries at most


@dataclass(frozen=True)
class DType:
    name: str
    storage: str  # numpy dtype of the raw storage
    kind: str  # float, bfloat16, int, bool, complex or raw (compared bit for bit only)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float64", "<f8", "float"),
        DType("float32", "<f4", "float"),
        DType("float16", "<f2", "float"),
        DType("bfloat16", "<u2", "bfloat16"),
        DType("int64", "<i8", "int"),
        DType("int32", "<i4", "int"),
        DType("int16", "<i2", "int"),
        DType("int8", "i1", "int"),
        DType("uint64", "<u8", "int"),
        DType("uint32", "<u4", "int"),
        DType("uint16", "<u2", "int"),
        DType("uint8", "u1", "int"),
        DType("bool", "u1", "bool"),
        DType("complex64", "<c8", "complex"),
        DType("complex128", "<c16", "complex"),
    )
}
SAFETENSORS_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}


def dtype(name: str) -> DType:
    """The dtype called ``name``; unknown ones (float8, float4...) compare as raw bytes."""
    return DTYPES.get(name) or DType(name, "u1", "raw")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    parameter: bool = False  # saved as an nn.Parameter, so requires_grad means something
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ValueEntry:
    type: str
    text: str  # repr, capped at MAX_VALUE_TEXT: for display only
    number: float | None = None  # for ints and floats (optimizer step counters)
    string: str | None = None  # for str values (optimizer param_names), capped
    # What equality is decided on: a digest of the whole value (a string changed
    # after its first 2,000 characters differs).
    digest: str = ""
    # For a container: (type name, str(key)) of each key, in order ("" for a
    # sequence's items), so that an int key is not taken for a str key.
    keys: tuple[tuple[str, str], ...] | None = None
    length: int | None = None  # a container's number of items


@dataclass(frozen=True)
class Container:
    """A dict, list or tuple met on the walk: compared by shape, not only by its leaves."""

    kind: str
    length: int
    keys: tuple[tuple[str, str], ...]  # (type name, str) of each key, in order; () for sequences


Entry = TensorEntry | ValueEntry


class TensorSource:
    """One opened checkpoint: ``entries`` in the file's order, tensors read on demand."""

    format = ""
    streamed = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self.entries: dict[str, Entry] = {}
        self._readers: dict[str, Callable[[], np.ndarray]] = {}
        # Each entry's typed key path from the root ((key type, key) per level): two
        # entries whose dotted names collide ({"a.b": x} and {"a": {"b": y}}) differ here.
        self.trails: dict[str, Trail] = {}
        self._repeats: dict[str, int] = {}

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a flat array of its storage dtype (a view where possible)."""
        return self._readers[name]()

    def scalar(self, name: str) -> float | None:
        """An int/float value or a one-element numeric tensor, as a float."""
        entry = self.entries.get(name)
        if isinstance(entry, ValueEntry):
            return entry.number
        if isinstance(entry, TensorEntry) and entry.numel == 1:
            kind = dtype(entry.dtype).kind
            if kind in ("float", "int", "bool"):
                return float(self.read(name)[0])
            if kind == "bfloat16":
                return float(bf16_to_f32(self.read(name))[0])
        return None

    def close(self) -> None:
        self._readers.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_tensor(
        self,
        name: str,
        entry: TensorEntry,
        reader: Callable[[], np.ndarray],
        trail: Trail | None = None,
    ) -> None:
        name = self._unique(name)
        self.entries[name] = entry
        self._readers[name] = reader
        if trail is not None:
            self.trails[name] = trail

    def _add_value(self, name: str, value: Any, trail: Trail | None = None) -> None:
        name = self._unique(name)
        self.entries[name] = _value_entry(value)
        if trail is not None:
            self.trails[name] = trail

    def _unique(self, name: str) -> str:
        if name not in self.entries:
            return name
        # A dict key holding a dot can collide with a nested path; keep both. A
        # counter per name keeps this linear however many entries collide.
        n = self._repeats.get(name, 1)
        while True:
            n += 1
            candidate = f"{name}#{n}"
            if candidate not in self.entries:
                self._repeats[name] = n
                return candidate


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def as_f64(chunk: np.ndarray, dtype_name: str) -> np.ndarray:
    """A chunk of raw storage values as float64 (bfloat16 from its bit patterns)."""
    if dtype(dtype_name).kind == "bfloat16":
        return bf16_to_f32(chunk).astype(np.float64)
    return chunk.astype(np.float64)


def _value_entry(value: Any) -> ValueEntry:
    if isinstance(value, Container):
        return _container_entry(value)
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    try:
        text = repr(value)
        digest = _digest(value, text)
    except RecursionError:
        raise ScanError(f"a value nested too deep to compare ({type(value).__name__})") from None
    if len(text) > MAX_VALUE_TEXT:
        text = text[:MAX_VALUE_TEXT] + f"... ({len(text):,} characters)"
    string = value[:MAX_VALUE_TEXT] if isinstance(value, str) else None
    return ValueEntry(type(value).__name__, text, number, string, digest)


def _digest(value: Any, text: str) -> str:
    h = hashlib.sha256(type(value).__name__.encode() + b"\0")
    if isinstance(value, str):
        h.update(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        h.update(bytes(value))
    elif isinstance(value, (set, frozenset)):  # no order: the sorted items' reprs
        for item in sorted(repr(x) for x in value):
            h.update(item.encode("utf-8", "surrogatepass") + b"\0")
    else:  # the full repr: exact for numbers (float repr round-trips), None, enums
        h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _container_entry(c: Container) -> ValueEntry:
    key_types = sorted({k for k, _ in c.keys})
    shown = f"<{c.kind} of {c.length}" + (f", keys: {'/'.join(key_types)}" if key_types else "")
    return ValueEntry(c.kind, shown + ">", None, None, f"container:{c.kind}", c.keys, c.length)


def walk(
    obj: Any,
    prefix: str = "",
    depth: int = 0,
    is_leaf: Callable[[Any], bool] | None = None,
    trail: Trail = (),
) -> Iterator[tuple[str, Any, Trail]]:
    """(dotted path, leaf, typed key path) triples; dotted paths as ``trainguard convert``
    names them, typed paths exact (a key's type and every level kept)."""
    if depth > MAX_DEPTH:
        raise ScanError(f"checkpoint structure nested deeper than {MAX_DEPTH} levels")
    dot = f"{prefix}." if prefix else ""
    here = prefix or ROOT
    if is_leaf is not None and is_leaf(obj):
        yield prefix, obj, trail
    elif isinstance(obj, Mapping):
        keys = tuple((type(k).__name__, str(k)[:MAX_VALUE_TEXT]) for k in obj)
        yield here, Container(type(obj).__name__, len(obj), keys), trail
        for k, v in obj.items():
            step = (type(k).__name__, str(k))
            yield from walk(v, f"{dot}{k}", depth + 1, is_leaf, (*trail, step))
    elif isinstance(obj, (list, tuple, collections.deque)) and not _is_tensor(obj):
        yield here, Container(type(obj).__name__, len(obj), ()), trail
        for i, v in enumerate(obj):
            yield from walk(v, f"{dot}{i}", depth + 1, is_leaf, (*trail, ("#", str(i))))
    elif isinstance(obj, (set, frozenset)):
        if any(_is_tensor(x) or isinstance(x, (Mapping, list, tuple, set, frozenset)) for x in obj):
            # Items of a set have no name or order to pair them by across two files.
            raise UsageError(
                f"{here}: a {type(obj).__name__} holding tensors or containers cannot be diffed"
            )
        yield prefix, obj, trail
    else:
        yield prefix, obj, trail


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "untyped_storage")
