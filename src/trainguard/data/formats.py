"""How a dataset file splits into samples: one table, one entry per format.

A *shard* is one file of the dataset; its *samples* are the records a
:class:`~trainguard.data.sealed.SealedDataset` hands out by index:

============  ===========================================================
format        samples
============  ===========================================================
``npy``       rows of a C-ordered ``.npy`` array along dim 0 (header parsed,
              never unpickled; object arrays are refused)
``torch``     rows along dim 0 of a ``torch.save`` file holding a tensor, or a
              tuple/list/dict of tensors of the same length (read only through
              trainguard's allowlist loader)
``jsonl``     lines of a JSON Lines file (parsed with ``json``)
``file``      the whole file is one sample (a folder of images, of texts)
============  ===========================================================

Each sample has a digest (SHA-256 over a canonical encoding: for tensors the
container's layout and each field's name, resolved dtype, row shape and values in
little-endian order), which is what the manifest seals
and what a read is checked against.  A new format is one :class:`Format` and
one line in :data:`FORMATS`.  Every read is bounded by a named cap; a file that
does not parse as its format raises :class:`ShardError` (a finding, never a
crash or a partial list).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from trainguard.errors import TrainguardError

MAX_NPY_HEADER = 64 * 1024  # numpy itself refuses headers over 10,000 bytes by default
MAX_JSONL_LINE = 16 * 1024 * 1024
MAX_FILE_SAMPLE = 512 * 1024 * 1024  # a whole-file sample read into memory
MAX_TORCH_SHARD = 4 * 1024 * 1024 * 1024  # a torch.save shard is loaded whole
MAX_SAMPLES_PER_SHARD = 10_000_000
MAX_DIMS = 32

NPY_MAGIC = b"\x93NUMPY"


class ShardError(TrainguardError):
    """A shard cannot be read as its format, or a cap was reached (rule TG1522)."""


class Reader:
    """An opened shard: its sample count, and sample ``i`` with its digest from one read."""

    count: int

    def read(self, i: int) -> tuple[Any, bytes]:
        raise NotImplementedError

    def digests(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield self.read(i)[1]


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]  # a file's format is chosen by its suffix; "" matches any
    open: Callable[[str], Reader]


def _sha(parts: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def tensor_row_digest(
    fields: list[tuple[str, str, tuple[int, ...], bytes]], layout: str = "tensor"
) -> bytes:
    """A sample made of tensor rows: (name, dtype, row shape, raw bytes) per field, in a
    container ``layout`` (tensor, tuple, list, dict: training gets that type back, so a
    shard re-saved in another is another sample).  ``dtype`` is the resolved type and
    ``raw`` the values in little-endian order: the digest is over the values, not over how
    a file spells them (``float32`` or ``<f4``, either byte order)."""
    parts = [b"tensor-row/2", layout.encode()]
    for name, dtype, shape, raw in fields:
        parts += [name.encode(), dtype.encode(), json.dumps(list(shape)).encode(), raw]
    return _sha(parts)


# -- npy: the header is a Python literal; parsed with literal_eval, bounded -----------------


@dataclass(frozen=True)
class NpyHeader:
    descr: str
    shape: tuple[int, ...]
    offset: int  # where the data starts
    itemsize: int

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        n = self.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


def npy_header(path: str) -> NpyHeader:
    import numpy as np

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(10)
        if len(head) < 10 or not head.startswith(NPY_MAGIC):
            raise ShardError(f"{path}: not a .npy file (no NUMPY magic)")
        major = head[6]
        if major == 1:
            length, start = int.from_bytes(head[8:10], "little"), 10
        elif major in (2, 3):
            head += fh.read(2)
            length, start = int.from_bytes(head[8:12], "little"), 12
        else:
            raise ShardError(f"{path}: unknown .npy version {major}")
        if length > MAX_NPY_HEADER:
            raise ShardError(f"{path}: .npy header of {length} bytes, over {MAX_NPY_HEADER}")
        raw = fh.read(length)
    if len(raw) != length:
        raise ShardError(f"{path}: truncated .npy header")
    try:
        text = raw.decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise ShardError(f"{path}: the .npy header is not a Python literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ShardError(f"{path}: the .npy header lacks descr, fortran_order or shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise ShardError(f"{path}: structured .npy dtypes are not supported")
    if fortran is not False:
        raise ShardError(f"{path}: Fortran-ordered .npy arrays are not supported (rows split)")
    valid = isinstance(shape, tuple) and 1 <= len(shape) <= MAX_DIMS
    if not valid or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ShardError(f"{path}: the .npy shape must be 1 to {MAX_DIMS} sizes >= 0")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise ShardError(f"{path}: unknown .npy dtype {descr[:40]!r}") from None
    if dtype.hasobject:
        raise ShardError(f"{path}: object .npy arrays need unpickling: refused")
    h = NpyHeader(descr, tuple(shape), start + length, dtype.itemsize)
    if h.rows > MAX_SAMPLES_PER_SHARD:
        raise ShardError(f"{path}: {h.rows} rows, over {MAX_SAMPLES_PER_SHARD}")
    if size != h.offset + h.rows * h.row_bytes:
        raise ShardError(
            f"{path}: {size} bytes, but the header says {h.offset + h.rows * h.row_bytes}"
        )
    return h


def _canonical(descr: str) -> Any:
    """The dtype a header's ``descr`` resolves to, in little-endian order."""
    import numpy as np

    return np.dtype(descr).newbyteorder("<")


def _npy_values(h: NpyHeader, raw: bytes) -> tuple[Any, bytes]:
    """The row as an array of the canonical dtype, and its bytes (what is digested)."""
    import numpy as np

    stored, canonical = np.dtype(h.descr), _canonical(h.descr)
    row = np.frombuffer(raw, dtype=stored).reshape(h.shape[1:])
    if stored != canonical:  # another byte order: the same values, swapped
        row = row.astype(canonical)
        raw = row.tobytes()
    return row, raw


def _npy_digest(h: NpyHeader, raw: bytes) -> bytes:
    _, values = _npy_values(h, raw)
    return tensor_row_digest([("", _canonical(h.descr).str, h.shape[1:], values)])


class NpyReader(Reader):
    def __init__(self, path: str) -> None:
        self.path, self.header = path, npy_header(path)
        self.count = self.header.rows

    def _raw(self, fh: Any) -> bytes:
        raw: bytes = fh.read(self.header.row_bytes)
        if len(raw) != self.header.row_bytes:
            raise ShardError(f"{self.path}: shorter than its header says")
        return raw

    def read(self, i: int) -> tuple[Any, bytes]:
        import numpy as np

        h = self.header
        _in_range(self.path, i, h.rows)
        with open(self.path, "rb") as fh:
            fh.seek(h.offset + i * h.row_bytes)
            raw = self._raw(fh)
        # Built from the very bytes that were digested: no second read.
        row, values = _npy_values(h, raw)
        digest = tensor_row_digest([("", _canonical(h.descr).str, h.shape[1:], values)])
        return np.array(row, dtype=_canonical(h.descr), copy=True), digest

    def digests(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            fh.seek(self.header.offset)
            for _ in range(self.count):
                yield _npy_digest(self.header, self._raw(fh))


# -- torch.save shards, only through the allowlist loader ------------------------------------


class TorchReader(Reader):
    """The shard is loaded once (through trainguard.load) and kept: rows are views of it."""

    def __init__(self, path: str) -> None:
        import torch

        from trainguard.loader import load

        self.path = path
        if os.path.getsize(path) > MAX_TORCH_SHARD:
            raise ShardError(f"{path}: over {MAX_TORCH_SHARD} bytes (loaded whole)")
        try:
            content = load(path, map_location="cpu")
        except TrainguardError as exc:
            raise ShardError(f"{path}: refused by trainguard's loader: {exc}") from None
        except Exception as exc:
            raise ShardError(
                f"{path}: not a readable torch.save file ({type(exc).__name__})"
            ) from None
        named: list[tuple[str, Any]]
        if isinstance(content, torch.Tensor):
            self.layout, named = "tensor", [("", content)]
        elif isinstance(content, (tuple, list)):
            self.layout = "tuple" if isinstance(content, tuple) else "list"
            named = [(str(i), v) for i, v in enumerate(content)]
        elif isinstance(content, dict) and all(isinstance(k, str) for k in content):
            self.layout, named = "dict", [(k, content[k]) for k in sorted(content)]
        else:
            raise ShardError(f"{path}: holds a {type(content).__name__}, not tensors")
        if not named or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for _, t in named):
            raise ShardError(f"{path}: every entry must be a tensor of at least one dimension")
        rows = {t.shape[0] for _, t in named}
        if len(rows) != 1:
            raise ShardError(f"{path}: its tensors differ in length along dim 0")
        self.count = int(next(iter(rows)))
        if self.count > MAX_SAMPLES_PER_SHARD:
            raise ShardError(f"{path}: over {MAX_SAMPLES_PER_SHARD} rows")
        self.named = [(n, t.detach().contiguous()) for n, t in named]

    def read(self, i: int) -> tuple[Any, bytes]:
        import torch

        _in_range(self.path, i, self.count)
        rows = [t[i].clone() for _, t in self.named]
        fields = []
        for (name, _), row in zip(self.named, rows, strict=True):
            flat = row.reshape(-1)
            raw = flat.view(torch.uint8).numpy().tobytes() if row.numel() else b""
            fields.append((name, str(row.dtype), tuple(row.shape), raw))
        digest = tensor_row_digest(fields, self.layout)
        if self.layout == "tensor":
            return rows[0], digest
        if self.layout == "tuple":
            return tuple(rows), digest
        if self.layout == "list":
            return rows, digest
        return {n: r for (n, _), r in zip(self.named, rows, strict=True)}, digest


# -- JSON Lines: an index of line offsets, built once ---------------------------------------


class JsonlReader(Reader):
    def __init__(self, path: str) -> None:
        self.path = path
        self.offsets: list[tuple[int, int]] = []  # (start, length without the line ending)
        pos = 0
        with open(path, "rb") as fh:
            while True:
                line = fh.readline(MAX_JSONL_LINE + 2)
                if not line:
                    break
                if len(line) > MAX_JSONL_LINE + 1 or (
                    len(line) > MAX_JSONL_LINE and not line.endswith(b"\n")
                ):
                    raise ShardError(
                        f"{path}: line {len(self.offsets) + 1} is over {MAX_JSONL_LINE} bytes"
                    )
                if len(self.offsets) >= MAX_SAMPLES_PER_SHARD:
                    raise ShardError(f"{path}: over {MAX_SAMPLES_PER_SHARD} lines")
                self.offsets.append((pos, len(line.rstrip(b"\r\n"))))
                pos += len(line)
        self.count = len(self.offsets)

    def _line(self, i: int) -> bytes:
        _in_range(self.path, i, self.count)
        start, length = self.offsets[i]
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(length)

    def read(self, i: int) -> tuple[Any, bytes]:
        line = self._line(i)
        digest = _sha([b"jsonl-line/1", line])
        try:
            return json.loads(line), digest
        except (ValueError, RecursionError):
            raise ShardError(f"{self.path}: line {i + 1} is not JSON") from None

    def digests(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield _sha([b"jsonl-line/1", self._line(i)])


# -- one file, one sample -------------------------------------------------------------------


class FileReader(Reader):
    def __init__(self, path: str) -> None:
        self.path, self.count = path, 1
        if os.path.getsize(path) > MAX_FILE_SAMPLE:
            raise ShardError(f"{path}: a whole-file sample over {MAX_FILE_SAMPLE} bytes")

    def read(self, i: int) -> tuple[Any, bytes]:
        _in_range(self.path, i, 1)
        with open(self.path, "rb") as fh:
            data = fh.read(MAX_FILE_SAMPLE + 1)
        if len(data) > MAX_FILE_SAMPLE:
            raise ShardError(f"{self.path}: a whole-file sample over {MAX_FILE_SAMPLE} bytes")
        return data, _sha([b"file/1", data])


def _in_range(path: str, i: int, n: int) -> None:
    if not 0 <= i < n:
        raise ShardError(f"{path}: no sample {i} (it holds {n})")


FORMATS: tuple[Format, ...] = (
    Format("npy", (".npy",), NpyReader),
    Format("torch", (".pt", ".pth"), TorchReader),
    Format("jsonl", (".jsonl",), JsonlReader),
    Format("file", ("",), FileReader),
)
BY_NAME = {f.name: f for f in FORMATS}


def format_of(name: str) -> Format:
    """The format a file of this name is read as (by suffix; anything else: ``file``)."""
    lower = name.lower()
    return next(f for f in FORMATS if any(lower.endswith(s) for s in f.suffixes))


def open_shard(path: str, fmt: Format) -> Reader:
    """The shard opened as ``fmt``; :class:`ShardError` for anything not of its format."""
    try:
        return fmt.open(path)
    except OSError as exc:
        raise ShardError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def sample_digests(path: str, fmt: Format) -> list[bytes]:
    """Every sample's digest, in order; :class:`ShardError` as :func:`open_shard`."""
    try:
        return list(open_shard(path, fmt).digests())
    except OSError as exc:
        raise ShardError(f"{path}: cannot be read: {exc.strerror or exc}") from None
