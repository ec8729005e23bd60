"""Large clean files for benchmarks, written without holding them in memory."""

from __future__ import annotations

import pickle
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainguard.samples.torchfmt import state_dict_pickle
from trainguard.samples.zipwriter import TORCH_ALIGNMENT, ZipWriter

MiB = 1024 * 1024
_TENSOR_BYTES = 64 * MiB  # one tensor per 64 MiB, like the layers of a mid-size model
_BLOCK_FLOATS = 256 * 1024  # a 1 MiB block of float32, repeated


def _float_block() -> bytes:
    rng = random.Random(0)
    return struct.pack(f"<{_BLOCK_FLOATS}f", *(rng.gauss(0.0, 0.02) for _ in range(_BLOCK_FLOATS)))


def _split(size_bytes: int, part: int) -> list[int]:
    """Sizes (multiples of 4 bytes) of the tensors that make up ``size_bytes``."""
    total = max(4, size_bytes - size_bytes % 4)
    sizes = [part] * (total // part)
    if total % part:
        sizes.append(total % part)
    return sizes


def _repeat(block: bytes, size: int) -> Iterator[bytes]:
    while size > 0:
        chunk = block[:size]
        size -= len(chunk)
        yield chunk


def build_large_torch_checkpoint(path: Path, size_bytes: int) -> Path:
    """A ``torch.save``-layout state dict of about ``size_bytes`` of float32 weights.

    Written straight to disk in 1 MiB pieces (zip64 past 4 GiB); loads with
    ``torch.load(weights_only=True)``.
    """
    sizes = _split(size_bytes, _TENSOR_BYTES)
    tensors = {f"layers.{i}.weight": (str(i), (n // 4,)) for i, n in enumerate(sizes)}
    data_pkl = state_dict_pickle(tensors)
    block = _float_block()
    with open(path, "wb") as f:
        w = ZipWriter(f, align=TORCH_ALIGNMENT)
        w.add_stream("archive/data.pkl", len(data_pkl), [data_pkl])
        for name, value in (
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ):
            w.add_stream(f"archive/{name}", len(value), [value])
        for i, n in enumerate(sizes):
            w.add_stream(f"archive/data/{i}", n, _repeat(block, n))
        for name, value in (("version", b"3\n"), (".data/serialization_id", b"0" * 40)):
            w.add_stream(f"archive/{name}", len(value), [value])
        w.close()
    return path


class _LazyArray:
    """Pickles as an ndarray, but only allocates it when the pickler gets there."""

    def __init__(self, nbytes: int, block: Any) -> None:
        self.nbytes = nbytes
        self.block = block

    def __reduce_ex__(self, protocol: Any) -> Any:
        import numpy as np

        arr = np.resize(self.block, self.nbytes // 4)
        return arr.__reduce_ex__(protocol)


def build_large_numpy_pickle(path: Path, size_bytes: int) -> Path:
    """A protocol-5 pickle of ``{name: float32 ndarray}`` totalling ``size_bytes``.

    Arrays are produced one at a time and the memo is off, so peak memory is
    one 64 MiB array rather than the whole file.
    """
    import numpy as np

    block = np.frombuffer(_float_block(), dtype=np.float32)
    arrays = {
        f"layer_{i}": _LazyArray(n, block) for i, n in enumerate(_split(size_bytes, _TENSOR_BYTES))
    }
    with open(path, "wb") as f:
        pickler = pickle.Pickler(f, protocol=5)
        # Without the memo the pickler keeps no reference to arrays it wrote.
        pickler.fast = True
        pickler.dump(arrays)
    return path
