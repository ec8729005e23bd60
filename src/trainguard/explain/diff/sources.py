"""Checkpoints opened for diffing: an index of entries, then tensors read one at a time.

Three ways in, all of them safe:

- safetensors: the header is validated by the scanner (TG801 refuses the file),
  then parsed here; each tensor is a read-only memory map of its byte range.
- PyTorch zip: the pickle is scanned and unpickled by the safe loader, but with
  storages that hold no bytes (torch ``meta`` tensors).  Each tensor remembers
  its storage, offset and strides; its bytes are mapped (stored members, as
  ``torch.save`` writes them) or read (compressed members) only when asked for.
- anything else ``trainguard.load`` reads (plain pickles, ``.npy``, ``.npz``,
  and torch zips when torch is absent): loaded whole, so memory holds the
  whole checkpoint.  :attr:`TensorSource.streamed` says which case applies.

A tensor comes back as a flat little-endian numpy array of its storage dtype
(``bfloat16`` as ``uint16`` bit patterns, dtypes numpy lacks as raw bytes).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainguard.errors import ScanError, UsageError
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.loader import tensors as load_tensors
from trainguard.loader.safeload import check_findings, load
from trainguard.loader.unpickler import safe_loads
from trainguard.loader.zipcheck import check_torch_zip
from trainguard.scanner import Policy, scan_file, ziplenient

# Bounds on what a checkpoint's structure may make us walk.
MAX_ENTRIES = 1_000_000
MAX_DEPTH = 64
MAX_VALUE_TEXT = 2_000  # characters of a non-tensor value kept for display
MAX_SIDECAR = 64 * 1024 * 1024
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
_SAFETENSORS_NAMES = {
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


# -- safetensors ---------------------------------------------------------------


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 1 << 32


class SafetensorsSource(TensorSource):
    format = "safetensors"

    def __init__(
        self, path: str, policy: Policy, strict: bool, limits: Limits, sidecar: bool = False
    ) -> None:
        super().__init__(path)
        self.sidecar = sidecar
        result = scan_file(path, policy=policy, limits=limits)
        if result.error is not None:
            raise ScanError(f"{path}: {result.error}")
        check_findings(path, result.findings, strict)  # TG801 (malformed) is high: refused
        try:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            base = 8 + n
            self._index(header, base)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # Only reachable when a policy lowered TG801/TG802 below refusal.
            raise ScanError(f"{path}: safetensors header unusable: {exc}") from None

    def _index(self, header: dict[str, Any], base: int) -> None:
        path = self.path
        # A sidecar is a second file beside the tensors that renames them: read it only
        # when asked, or a planted one could rename a changed tensor back.
        refs = _sidecar(Path(path)) if self.sidecar else None
        names = [k for k in header if k != "__metadata__"]
        order: list[tuple[str, Any]] = (
            refs if refs is not None else [(k, {"__tensor__": k}) for k in names]
        )
        seen: set[str] = set()
        for name, leaf in order:
            if isinstance(leaf, dict) and leaf.get("__tensor__") in header:
                key = leaf["__tensor__"]
                seen.add(key)
                self._add_st(name, header[key], base)
            else:
                self._add_value(name, leaf)
        for key in names:
            if key not in seen:
                self._add_st(key, header[key], base)
        if refs is not None:
            self.format = "safetensors + JSON sidecar"

    def _add_st(self, name: str, info: dict[str, Any], base: int) -> None:
        code = str(info["dtype"])
        dt = dtype(_SAFETENSORS_NAMES.get(code, code.lower()))
        begin, end = (int(x) for x in info["data_offsets"])
        entry = TensorEntry(dt.name, tuple(int(d) for d in info["shape"]), end - begin)
        path = self.path

        def reader() -> np.ndarray:
            raw = np.dtype(dt.storage)
            count = (end - begin) // raw.itemsize
            if count == 0:
                return np.empty(0, dtype=raw)
            return np.memmap(path, dtype=raw, mode="r", offset=base + begin, shape=(count,))

        self._add_tensor(name, entry, reader)


def _sidecar(path: Path) -> list[tuple[str, Any]] | None:
    """Entries of ``trainguard convert``'s JSON sidecar, when it names this file."""
    side = path.with_suffix(".json")
    try:
        if not side.is_file() or side.stat().st_size > MAX_SIDECAR:
            return None
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("tensors") != path.name or "structure" not in doc:
        return None

    def special(obj: Any) -> bool:
        markers = ("__tensor__", "__repr__", "__bytes_hex__")
        return isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in markers

    return [(name, leaf) for name, leaf, _ in walk(doc["structure"], is_leaf=special)]


# -- PyTorch zip, lazily ---------------------------------------------------------


class _Lazy:
    """``persistent_load`` handing out storages that hold no bytes (torch meta tensors)."""

    def __init__(self, torch: Any, entries: dict[str, ziplenient.ZipEntry], prefix: str, src: str):
        self.torch = torch
        self.entries = entries
        self.prefix = prefix
        self.source = src
        self.storages: dict[str, load_tensors.Storage] = {}
        self.by_impl: dict[int, str] = {}

    def __call__(self, pid: Any) -> load_tensors.Storage:
        refuse = load_tensors.refuse
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise refuse("TG401", f"unexpected persistent id {pid!r:.80}", self.source)
        _, kind, key, _location, numel = pid
        if not isinstance(kind, load_tensors.StorageType) or not isinstance(key, str):
            raise refuse("TG401", "storage reference of an unknown type", self.source)
        if not isinstance(numel, int) or numel < 0:
            raise refuse("TG402", f"bad storage size {numel!r:.40}", self.source)
        cached = self.storages.get(key)
        if cached is not None:
            if cached.kind != kind:
                raise refuse("TG402", f"storage {key} reused with another dtype", self.source)
            return cached
        entry = self.entries.get(f"{self.prefix}/data/{key}")
        need = numel * kind.itemsize
        if entry is None or entry.size < need:
            have = "none" if entry is None else entry.size
            raise refuse("TG402", f"storage {key} needs {need} bytes, archive holds {have}")
        torch_dtype = load_tensors.STORAGE_TYPES[kind.name][0]
        meta = self.torch.empty(numel, dtype=getattr(self.torch, torch_dtype), device="meta")
        storage = load_tensors.Storage(kind, meta, numel)
        self.storages[key] = storage
        # Views of one storage share its StorageImpl, which is how a rebuilt
        # tensor is traced back to its key (the meta tensors stay referenced
        # here, so no address is reused while the index lives).
        self.by_impl[meta.untyped_storage()._cdata] = key
        return storage


class TorchZipSource(TensorSource):
    format = "pytorch zip"

    def __init__(self, path: str, policy: Policy, strict: bool, limits: Limits, torch: Any):
        super().__init__(path)
        self._file: BinaryIO = open(path, "rb")  # closed by close()
        try:
            self._index(policy, strict, limits, torch)
        except BaseException:
            self._file.close()
            raise

    def _index(self, policy: Policy, strict: bool, limits: Limits, torch: Any) -> None:
        f, source = self._file, self.path
        check = check_torch_zip(f, self.size, policy, limits)
        by_name = {e.name: e for e in check.directory.entries}  # last wins, as in torch
        pickles = [n for n in by_name if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UsageError(f"{source}: expected one data.pkl in the zip, found {len(pickles)}")
        check_findings(source, check.findings, strict)
        prefix = pickles[0].rsplit("/", 1)[0]
        byteorder = by_name.get(f"{prefix}/byteorder")
        if byteorder is not None:
            with ziplenient.open_member(f, byteorder, limits) as member:
                if member.read(16).strip() not in (b"", b"little"):
                    raise UsageError(f"{source}: big-endian checkpoints are not supported")
        lazy = _Lazy(torch, by_name, prefix, source)
        obj = safe_loads(
            check.pickles[pickles[0]][1],
            persistent_load=lazy,
            allow=policy.allow_globals,
            source=source,
        )
        self._limits = limits
        self._by_name = by_name
        self._prefix = prefix
        for count, (name, leaf, trail) in enumerate(walk(obj)):
            if count >= MAX_ENTRIES:
                raise ScanError(f"{source}: more than {MAX_ENTRIES:,} entries")
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
                key = lazy.by_impl[leaf.untyped_storage()._cdata]
                self._add_lazy(name, leaf, key, lazy.storages[key], torch, trail)
            else:
                _add_leaf(self, name, leaf, torch, trail)

    def _add_lazy(
        self,
        name: str,
        t: Any,
        key: str,
        storage: load_tensors.Storage,
        torch: Any,
        trail: Trail,
    ) -> None:
        dt = dtype(str(t.dtype).removeprefix("torch."))
        shape, stride, offset = tuple(t.shape), tuple(t.stride()), int(t.storage_offset())
        entry = TensorEntry(
            dt.name,
            shape,
            t.numel() * t.element_size(),
            parameter=isinstance(t, torch.nn.Parameter),
            requires_grad=bool(t.requires_grad),
        )
        numel = storage.numel

        def reader() -> np.ndarray:
            flat = self._storage(key, np.dtype(dt.storage), numel)
            n = entry.numel
            contiguous = all(
                st == _prod(shape[i + 1 :]) for i, st in enumerate(stride) if shape[i] > 1
            )
            if n == 0:
                return flat[:0]
            if contiguous:
                return flat[offset : offset + n]
            # check_view (in the safe loader) proved the view lies inside the storage.
            item = flat.itemsize
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=shape, strides=tuple(s * item for s in stride), writeable=False
            )
            return np.ascontiguousarray(view).reshape(-1)

        self._add_tensor(name, entry, reader, trail)

    def _storage(self, key: str, raw: np.dtype[Any], numel: int) -> np.ndarray:
        entry = self._by_name[f"{self._prefix}/data/{key}"]
        if numel == 0:
            return np.empty(0, dtype=raw)
        if entry.method == ziplenient.STORED and entry.compressed_size == entry.size:
            return np.memmap(self.path, dtype=raw, mode="r", offset=entry.data_offset, shape=numel)
        buf = np.empty(numel * raw.itemsize, dtype=np.uint8)
        view = memoryview(buf)  # type: ignore[arg-type]
        with ziplenient.open_member(self._file, entry, self._limits) as member:
            got = 0
            while got < len(view):
                n = member.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    raise ScanError(f"{self.path}: storage {key} is truncated")
                got += n
        return buf.view(raw)

    def close(self) -> None:
        super().close()
        self._file.close()


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# -- loaded whole --------------------------------------------------------------------


class LoadedSource(TensorSource):
    """Whatever ``trainguard.load`` returns, held in memory."""

    streamed = False

    def __init__(self, path: str, policy: Policy, strict: bool, limits: Limits, fmt: str):
        super().__init__(path)
        self.format = fmt
        obj = load(path, policy=policy, map_location="cpu", strict=strict, limits=limits)
        torch = load_tensors.torch_or_none()
        for count, (name, leaf, trail) in enumerate(walk(obj)):
            if count >= MAX_ENTRIES:
                raise ScanError(f"{path}: more than {MAX_ENTRIES:,} entries")
            _add_leaf(self, name, leaf, torch, trail)


def _add_leaf(src: TensorSource, name: str, leaf: Any, torch: Any, trail: Trail) -> None:
    arr: np.ndarray | None = None
    entry: TensorEntry | None = None
    if torch is not None and isinstance(leaf, torch.Tensor):
        t = leaf.detach().to("cpu").contiguous()
        name_ = str(t.dtype).removeprefix("torch.")
        if name_ in DTYPES:
            raw = t.view(torch.int16) if name_ == "bfloat16" else t
            arr = raw.numpy().reshape(-1).view(np.dtype(DTYPES[name_].storage))
            entry = TensorEntry(
                name_,
                tuple(t.shape),
                arr.nbytes,
                parameter=isinstance(leaf, torch.nn.Parameter),
                requires_grad=bool(leaf.requires_grad),
            )
    elif isinstance(leaf, np.ndarray) and leaf.dtype.name in DTYPES and leaf.dtype.byteorder != ">":
        arr = np.ascontiguousarray(leaf).reshape(-1).view(np.dtype(DTYPES[leaf.dtype.name].storage))
        entry = TensorEntry(leaf.dtype.name, tuple(leaf.shape), arr.nbytes)
    if arr is None or entry is None:
        src._add_value(name, leaf, trail)
        return
    held = arr
    src._add_tensor(name, entry, lambda: held, trail)


# -- dispatch ------------------------------------------------------------------------


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    policy: Policy | None = None,
    strict: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    sidecar: bool = False,
) -> TensorSource:
    """Open ``path`` for diffing; raises UnsafeModelError for anything the scanner refuses.

    ``sidecar``: for safetensors, also read ``trainguard convert``'s JSON sidecar.
    """
    source = os.fspath(path)
    policy = policy or Policy()
    if not os.path.isfile(source):
        raise UsageError(f"{source}: no such file")
    with open(source, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        return SafetensorsSource(source, policy, strict, limits, sidecar)
    if head[:4] == b"PK\x03\x04":
        torch = load_tensors.torch_or_none()
        if torch is not None:
            try:
                return TorchZipSource(source, policy, strict, limits, torch)
            except UsageError:
                pass  # npz and other zips: the safe loader knows them or says why not
        return LoadedSource(source, policy, strict, limits, "zip (loaded whole)")
    fmt = "npy" if head[:6] == b"\x93NUMPY" else "pickle"
    return LoadedSource(source, policy, strict, limits, fmt)
