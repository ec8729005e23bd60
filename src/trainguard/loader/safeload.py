"""``trainguard.load``: load a checkpoint without running code from it.

The file is opened once.  The bytes that carry code (the pickle) are read into
memory, analysed by the scanner, and then unpickled by the allowlist
unpickler: what was checked is exactly what is loaded.  Tensor bytes are read
from the same open file straight into their buffers.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

from trainguard.errors import MissingExtraError, ScanError, UnsafeModelError, UsageError
from trainguard.findings import Finding, Severity
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.loader import tensors
from trainguard.loader.trust import check_bytes, trust_from
from trainguard.loader.unpickler import safe_loads
from trainguard.loader.zipcheck import check_torch_zip
from trainguard.scanner import Policy, scan_bytes, ziplenient
from trainguard.scanner.engine import scan_pickle_bytes
from trainguard.scanner.formats.pickles import strong_sniff, weak_sniff

TORCH_LEGACY_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_findings(source: str, findings: list[Finding], strict: bool) -> None:
    """Raise :class:`UnsafeModelError` when a finding reaches the refusal level."""
    threshold = Severity.MEDIUM if strict else Severity.HIGH
    bad = [f for f in findings if f.severity >= threshold]
    if bad:
        raise UnsafeModelError(source, bad)


def load(
    path: str | os.PathLike[str],
    *,
    policy: Policy | None = None,
    map_location: Any = None,
    strict: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    trust: Any = None,
) -> Any:
    """The checkpoint's contents, rebuilt without executing code from the file.

    Supports PyTorch zip checkpoints, plain pickles of data, numpy ``.npy`` and
    ``.npz``.  Raises :class:`UnsafeModelError` (with the findings) for anything
    the scanner rates high or above (medium too with ``strict``) and for any
    import outside the allowlist or the policy's ``[allow] globals``.  With
    ``trust`` (a trust-policy file), the file must also be covered, byte for
    byte, by a seal from a signer the policy trusts (:mod:`trainguard.loader.trust`).
    """
    policy = policy or Policy()
    source = str(path)
    trusted = trust_from(trust)
    with open(path, "rb") as raw:
        f: BinaryIO = raw
        size = os.fstat(raw.fileno()).st_size
        if trusted is not None:
            # The seal vouches for the whole file: check every byte, then load
            # from that copy, so a file changed after the check changes nothing.
            whole = raw.read()
            check_bytes(trusted, source, whole)
            f, size = io.BytesIO(whole), len(whole)
        head = f.read(16)
        f.seek(0)
        if head[:4] == b"PK\x03\x04":
            return _load_zip(f, size, source, policy, map_location, strict, limits)
        if size > limits.max_in_memory_member:
            raise ScanError(f"{source}: {size} bytes is over the in-memory limit for pickles")
        data = f.read()
    if head[:6] == b"\x93NUMPY":
        return _load_npy(data, source, policy, strict)
    if head.startswith(TORCH_LEGACY_PREFIX):
        raise UsageError(
            f"{source}: the legacy (pre-1.6) PyTorch format is not supported by "
            "trainguard.load yet; scan it, then re-save it with a current torch"
        )
    if strong_sniff(head) or weak_sniff(data[:4096]):
        findings = scan_pickle_bytes(data, policy=policy, limits=limits)
        check_findings(source, findings, strict)
        return safe_loads(data, allow=policy.allow_globals, source=source)
    raise UsageError(f"{source}: not a format trainguard.load reads (pickle, torch zip, npy)")


def _load_npy(data: bytes, source: str, policy: Policy, strict: bool) -> Any:
    import numpy as np

    result = scan_bytes(data, source, policy=policy)
    check_findings(source, result.findings, strict)
    if any(f.rule == "TG301" for f in result.findings):
        raise UsageError(f"{source}: object arrays are not supported by trainguard.load")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _load_zip(
    f: BinaryIO,
    size: int,
    source: str,
    policy: Policy,
    map_location: Any,
    strict: bool,
    limits: Limits,
) -> Any:
    check = check_torch_zip(f, size, policy, limits)
    by_name = {e.name: e for e in check.directory.entries}  # last one wins, as in torch
    pickles = [n for n in by_name if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        if by_name and all(n.endswith(".npy") for n in by_name):
            return _load_npz(f, size, source, policy, strict)
        raise UsageError(f"{source}: zip without a PyTorch data.pkl")
    if len(pickles) > 1:
        raise tensors.refuse("TG204", f"several data.pkl records: {', '.join(pickles)}", source)
    check_findings(source, check.findings, strict)
    pkl_name = pickles[0]
    prefix = pkl_name.rsplit("/", 1)[0]
    pkl = check.pickles[pkl_name][1]
    byteorder = by_name.get(f"{prefix}/byteorder")
    if byteorder is not None:
        with ziplenient.open_member(f, byteorder, limits) as member:
            if member.read(16).strip() not in (b"", b"little"):
                raise UsageError(f"{source}: big-endian checkpoints are not supported")
    storages = _StorageReader(f, by_name, prefix, source, limits, map_location)
    return safe_loads(pkl, persistent_load=storages, allow=policy.allow_globals, source=source)


def _load_npz(f: BinaryIO, size: int, source: str, policy: Policy, strict: bool) -> Any:
    import numpy as np

    f.seek(0)
    data = f.read(size)
    result = scan_bytes(data, source, policy=policy)
    check_findings(source, result.findings, strict)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class _StorageReader:
    """``persistent_load`` for PyTorch zips: reads ``<prefix>/data/<key>`` once per key."""

    def __init__(
        self,
        f: BinaryIO,
        entries: dict[str, ziplenient.ZipEntry],
        prefix: str,
        source: str,
        limits: Limits,
        map_location: Any,
    ) -> None:
        self.f = f
        self.entries = entries
        self.prefix = prefix
        self.source = source
        self.limits = limits
        self.map_location = map_location
        self.cache: dict[str, tensors.Storage] = {}
        self.torch = tensors.torch_or_none()

    def __call__(self, pid: Any) -> tensors.Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise tensors.refuse("TG401", f"unexpected persistent id {pid!r:.80}", self.source)
        _, kind, key, location, numel = pid
        if not isinstance(kind, tensors.StorageType) or not isinstance(key, str):
            raise tensors.refuse("TG401", "storage reference of an unknown type", self.source)
        if not isinstance(numel, int) or numel < 0 or not isinstance(location, str):
            raise tensors.refuse("TG402", f"bad storage size {numel!r:.40}", self.source)
        cached = self.cache.get(key)
        if cached is not None:
            if cached.kind != kind:
                raise tensors.refuse("TG402", f"storage {key} reused with another dtype")
            return cached
        storage = self._read(kind, key, location, numel)
        self.cache[key] = storage
        return storage

    def _read(
        self, kind: tensors.StorageType, key: str, location: str, numel: int
    ) -> tensors.Storage:
        entry = self.entries.get(f"{self.prefix}/data/{key}")
        need = numel * kind.itemsize
        if entry is None or entry.size < need:
            raise tensors.refuse(
                "TG402",
                f"storage {key} declares {need} bytes but the archive holds "
                f"{'none' if entry is None else entry.size}",
                self.source,
            )
        torch_dtype, np_dtype, _ = tensors.STORAGE_TYPES[kind.name]
        if self.torch is not None:
            torch = self.torch
            buf = torch.empty(need, dtype=torch.uint8)
            self._fill(entry, memoryview(buf.numpy()))
            data = buf.view(getattr(torch, torch_dtype))
            data = self._place(data, location)
        else:
            import numpy as np

            if np_dtype is None:
                raise MissingExtraError("torch", "torch", f"loading {torch_dtype} tensors")
            arr = np.empty(need, dtype=np.uint8)
            self._fill(entry, memoryview(arr))  # type: ignore[arg-type]
            data = arr.view(np.dtype(np_dtype))
        return tensors.Storage(kind, data, numel)

    def _fill(self, entry: ziplenient.ZipEntry, view: memoryview) -> None:
        with ziplenient.open_member(self.f, entry, self.limits) as member:
            got = 0
            while got < len(view):
                n = member.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    raise tensors.refuse("TG402", f"storage {entry.name} is truncated", self.source)
                got += n

    def _place(self, data: Any, location: str) -> Any:
        target = self.map_location
        if isinstance(target, dict):
            target = target.get(location, location)
        if target is None:
            target = location
        if callable(target):
            raise UsageError("map_location functions are not supported; pass a device or a dict")
        device = str(target)
        return data if device == "cpu" else data.to(device)
