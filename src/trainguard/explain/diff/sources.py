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

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainguard.errors import ScanError, UsageError
from trainguard.explain.diff.entries import (
    DTYPES,
    SAFETENSORS_NAMES,
    TensorEntry,
    TensorSource,
    Trail,
    dtype,
    walk,
)
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.loader import tensors as load_tensors
from trainguard.loader.safeload import check_findings, load
from trainguard.loader.unpickler import safe_loads
from trainguard.loader.zipcheck import check_torch_zip
from trainguard.scanner import Policy, scan_file, ziplenient

# Bounds on what a checkpoint's structure may make us walk.
MAX_ENTRIES = 1_000_000
MAX_SIDECAR = 64 * 1024 * 1024


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
        dt = dtype(SAFETENSORS_NAMES.get(code, code.lower()))
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
