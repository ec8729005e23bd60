"""Pieces of PyTorch's pickle dialect, emitted with the assembler.

A ``torch.save`` pickle stores each tensor as
``torch._utils._rebuild_tensor_v2(<persistent id>, offset, size, stride,
requires_grad, OrderedDict())`` where the persistent id
``('storage', torch.FloatStorage, key, 'cpu', numel)`` points at the zip member
``data/<key>``.  Emitting it by hand lets a sample put a payload next to real
weights without importing torch to build it.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from trainguard.samples.assembler import PickleAsm


def float_bytes(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    step = 1
    for dim in reversed(shape):
        stride.append(step)
        step *= dim
    return tuple(reversed(stride))


def emit_tensor(
    a: PickleAsm, key: str, shape: tuple[int, ...], storage: str = "FloatStorage"
) -> PickleAsm:
    """Push a float tensor whose data is zip member ``data/<key>``."""
    numel = 1
    for dim in shape:
        numel *= dim
    a.global_("torch._utils", "_rebuild_tensor_v2")
    a.mark()
    a.mark().str_("storage").global_("torch", storage).str_(key).str_("cpu").push(numel)
    a.tuple_().binpersid()
    a.push(0).push(shape).push(contiguous_stride(shape)).push(False)
    a.global_("collections", "OrderedDict").empty_tuple().reduce()
    return a.tuple_().reduce()


def state_dict_pickle(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    payload: Callable[[PickleAsm], None] | None = None,
    protocol: int = 2,
) -> bytes:
    """``{name: tensor}`` as torch pickles it; ``payload`` may add more items.

    ``payload`` runs with the dict on top of the stack and must leave it there.
    """
    a = PickleAsm(protocol).proto(protocol)
    a.global_("collections", "OrderedDict").empty_tuple().reduce()
    for name, (key, shape) in tensors.items():
        a.str_(name)
        emit_tensor(a, key, shape)
        a.setitem()
    if payload is not None:
        payload(a)
    return a.stop().getvalue()


def write_legacy_tar(path: Path, pickle_bytes: bytes) -> Path:
    """The pre-1.6 ``torch.save`` tar layout: storages, tensors, pickle.

    torch 2.13 still reads it when ``weights_only=False``: it unpickles the
    ``storages`` and ``tensors`` headers and then the ``pickle`` member.
    """
    members = {
        "storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
        "tensors": pickle.dumps(0, protocol=2),
        "pickle": pickle_bytes,
    }
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
