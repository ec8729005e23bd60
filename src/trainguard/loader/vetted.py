"""What the restricted unpickler may call: a small table, each entry checked.

Containers and plain data types; numpy's array, dtype, scalar and random-state
reconstructors (numpy rebuilds from raw bytes); torch's tensor and parameter
rebuilds, called only after their arguments are checked: the storage is a
real storage, the view lies inside it (the class of bug behind
CVE-2026-24747), no backward hooks, no state that sets private attributes.
Anything else the file calls needs the user's policy.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import functools
import importlib
import io
import pathlib
import types
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from trainguard.loader.tensors import check_view, refuse


class Maker(Protocol):
    """The unpickler's way to create an instance without calling its class."""

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


_BUILTINS = "set frozenset list dict tuple int float complex bool bytes bytearray str slice range"
_PLAIN_TYPES: tuple[type, ...] = (
    collections.OrderedDict,
    collections.Counter,
    collections.deque,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    datetime.timezone,
    decimal.Decimal,
    fractions.Fraction,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    uuid.UUID,
    types.SimpleNamespace,
)
# Real objects, resolved when numpy/torch are installed; numpy's reconstructors
# return objects that then take their state (BUILD), hence "buildable".
_NUMPY_BUILDABLE = [f"{core}.multiarray._reconstruct" for core in ("numpy.core", "numpy._core")] + [
    "numpy.dtype",
    "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
]
_NUMPY_PLAIN = [
    *(f"{core}.multiarray.scalar" for core in ("numpy.core", "numpy._core")),
    *(f"{core}.numeric._frombuffer" for core in ("numpy.core", "numpy._core")),
    "numpy.ndarray",
    "numpy.random.mtrand.RandomState",
    "numpy.random._generator.Generator",
    *(
        f"numpy.random._{m}.{c}"
        for m, c in [
            ("mt19937", "MT19937"),
            ("pcg64", "PCG64"),
            ("pcg64", "PCG64DXSM"),
            ("philox", "Philox"),
            ("sfc64", "SFC64"),
        ]
    ),
    *(
        f"numpy.{d}"
        for d in (
            "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
            "float16 float32 float64 complex64 complex128"
        ).split()
    ),
]
_TORCH_PLAIN = [
    "torch.Size",
    "torch.device",
    "torch.serialization._get_layout",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    *(
        f"torch.{d}"
        for d in (
            "strided sparse_coo sparse_csr contiguous_format channels_last channels_last_3d "
            "preserve_format float32 float float64 double float16 half bfloat16 complex64 "
            "complex128 uint8 int8 int16 short int32 int int64 long bool "
            # layouts of sparse tensors and quantization schemes: values, not code
            "sparse_csc sparse_bsr sparse_bsc per_tensor_affine per_channel_affine "
            "per_channel_affine_float_qparams quint8 qint8 qint32 quint4x2"
        ).split()
    ),
]


# Names inside denied modules (torch._C) that the table below rebuilds exactly: the
# sandbox lets their import through, the vetted function decides the call.
DENIED_BUT_VETTED = frozenset(["torch._C.Generator"])


# Classes the file may name as values (the type argument of a rebuild), never call:
# calling them makes objects that would then accept state (a tensor's __setstate__
# swaps its storage and installs backward hooks).
VALUE_NAMES = frozenset(
    [
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "numpy.ndarray",
        "numpy.random._generator.Generator",
        *(n for n in _NUMPY_PLAIN if n.startswith("numpy.random._")),
    ]
)


def _resolve(qualified: str) -> Any:
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _buildable(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    wrapper.__trainguard_buildable__ = True  # type: ignore[attr-defined]
    return wrapper


@functools.cache
def static_table() -> dict[str, Any]:
    """The entries every load shares (built once: protect() calls it before any sandbox)."""
    import builtins
    import re

    table: dict[str, Any] = {f"builtins.{n}": getattr(builtins, n) for n in _BUILTINS.split()}
    table.update({f"{t.__module__}.{t.__qualname__}": t for t in _PLAIN_TYPES})
    table["pathlib.Path"] = pathlib.Path
    table["_codecs.encode"] = _encode
    table["collections.defaultdict"] = _defaultdict
    table["re._compile"] = re.compile
    for name in _NUMPY_BUILDABLE:
        obj = _resolve(name)
        if obj is not None:
            table[name] = _buildable(obj)
    for name in [*_NUMPY_PLAIN, *_TORCH_PLAIN]:
        obj = _resolve(name)
        if obj is not None:
            table[name] = obj
    if _resolve("torch.Tensor") is not None:
        table.update(_torch_rebuilds())
    return table


def table(unpickler: Maker) -> dict[str, Any]:
    """The vetted table for one load (copyreg's helpers create objects of this load)."""
    ours = dict(static_table())

    def reconstructor(cls: Any, base: Any, state: Any) -> Any:
        if base is not object:
            raise refuse("TG401", f"copyreg._reconstructor with base {base!r:.60}")
        return unpickler.new(cls, (), {})

    ours["copyreg._reconstructor"] = reconstructor
    ours["copyreg.__newobj__"] = lambda cls, *args: unpickler.new(cls, args, {})
    ours["copyreg.__newobj_ex__"] = lambda cls, args, kwargs: unpickler.new(cls, args, kwargs)
    return ours


def cython_rebuild(func: Any, module: str, cls_name: str, unpickler: Any) -> Any:
    """Cython's ``__pyx_unpickle_X(type, checksum, state)``, for ``module.X`` only.

    It creates ``type`` without calling it and sets its fields from ``state``,
    the same power as NEWOBJ and BUILD: allowed when ``type`` is that very class.
    """

    def rebuild(cls: Any, checksum: Any, state: Any) -> Any:
        real = getattr(cls, "cls", cls)
        if f"{real.__module__}.{real.__qualname__}" != f"{module}.{cls_name}":
            raise refuse("TG401", f"{module}.__pyx_unpickle_{cls_name} of another class")
        return unpickler.mark_created(func(real, checksum, state))

    return rebuild


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocols 0-2 spell bytes as _codecs.encode(str, "latin1"); other codecs
    # (zlib, bz2, base64) would decompress attacker-sized data.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise refuse("TG401", f"_codecs.encode with {encoding!r:.30}")
    return text.encode("latin1")


_FACTORIES = frozenset([None, list, dict, set, int, float, str, tuple, collections.OrderedDict])


def _defaultdict(factory: Any = None, *args: Any) -> Any:
    # The factory is called later on every missing key: only plain containers.
    if factory not in _FACTORIES or args:
        raise refuse("TG401", f"defaultdict whose factory is {factory!r:.60}")
    return collections.defaultdict(factory)


# -- torch ------------------------------------------------------------------------


def _plain_data(value: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        pairs = value.items()
        return all(_plain_data(k, depth + 1) and _plain_data(v, depth + 1) for k, v in pairs)
    return False


def _check_state(state: Any) -> None:
    """Attributes a parameter or tensor subclass gets from the file: public, plain data."""
    if not state:
        return
    parts = state if isinstance(state, tuple) else (state,)
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and not k.startswith("_") and _plain_data(v) for k, v in part.items()
        ):
            raise refuse("TG401", "tensor state sets private or non-data attributes from the file")


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
        raise refuse("TG401", "tensor carries backward hooks (callables from the file)")


def _torch_rebuilds() -> dict[str, Any]:
    import torch

    # torch's rebuild functions are untyped; they are only reached through the checks here.
    u: Any = importlib.import_module("torch._utils")

    def storage_numel(storage: Any) -> int:
        if isinstance(storage, torch.storage.TypedStorage):
            typed: Any = storage  # untyped in torch
            return int(typed._size())
        raise refuse("TG402", f"a tensor's storage is {type(storage).__name__}, not a storage")

    def v1(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
        check_view(storage_numel(storage), offset, tuple(size), tuple(stride))
        return u._rebuild_tensor(storage, offset, size, stride)

    def v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
           backward_hooks: Any, metadata: Any = None) -> Any:  # fmt: skip
        _no_hooks(backward_hooks)
        if metadata is not None and not _plain_data(metadata):
            raise refuse("TG401", "tensor metadata that is not plain data")
        check_view(storage_numel(storage), offset, tuple(size), tuple(stride))
        grad = bool(requires_grad)
        return u._rebuild_tensor_v2(storage, offset, size, stride, grad, {}, metadata)

    def v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
           backward_hooks: Any, dtype: Any, metadata: Any = None) -> Any:  # fmt: skip
        _no_hooks(backward_hooks)
        if not isinstance(dtype, torch.dtype):
            raise refuse("TG401", "tensor dtype is not a torch dtype")
        check_view(storage_numel(storage), offset, tuple(size), tuple(stride))
        return u._rebuild_tensor_v3(
            storage, offset, size, stride, bool(requires_grad), {}, dtype, metadata
        )

    def parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
        _no_hooks(backward_hooks)
        if not isinstance(data, torch.Tensor):
            raise refuse("TG401", "a parameter's data is not a tensor")
        return torch.nn.Parameter(data, bool(requires_grad))

    def parameter_with_state(data: Any, requires_grad: Any, hooks: Any, state: Any) -> Any:
        _check_state(state)
        return u._set_obj_state(parameter(data, requires_grad, hooks), state)

    rebuilds = (v1, v2, v3, parameter)

    def from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if func not in rebuilds or not isinstance(args, tuple):
            raise refuse("TG401", "_rebuild_from_type_v2 with a function outside the allowlist")
        if new_type not in (torch.Tensor, torch.nn.Parameter):
            raise refuse("TG401", f"tensor subclass {new_type!r:.60} is outside the allowlist")
        _check_state(state)
        result = func(*args)
        if type(result) is not new_type:
            result = result.as_subclass(new_type)
        return u._set_obj_state(result, state)

    def from_bytes(data: Any) -> Any:
        # pickle.dumps(tensor) nests a legacy torch stream: torch's weights-only loader.
        if not isinstance(data, bytes):
            raise refuse("TG401", "torch.storage._load_from_bytes of something else than bytes")
        return torch.load(io.BytesIO(data), weights_only=True)

    def meta(dtype: Any, size: Any, stride: Any, requires_grad: Any) -> Any:
        if not isinstance(dtype, torch.dtype):
            raise refuse("TG401", "meta tensor dtype is not a torch dtype")
        return u._rebuild_meta_tensor_no_storage(dtype, size, stride, bool(requires_grad))

    def sparse(layout: Any, data: Any) -> Any:
        # The red team's F4: sparse COO/CSR/CSC/BSR/BSC tensors, checked as torch's own
        # weights-only loader does (its invariants, right after the rebuild).
        if not isinstance(layout, torch.layout) or not isinstance(data, tuple):
            raise refuse("TG401", "sparse tensor rebuild with a layout or data of other types")
        if not all(
            isinstance(x, (torch.Tensor, torch.Size, tuple, bool, type(None))) for x in data
        ):
            raise refuse("TG401", "sparse tensor rebuild from something else than tensors")
        result = u._rebuild_sparse_tensor(layout, data)
        u._validate_loaded_sparse_tensors()
        return result

    def qtensor(storage: Any, offset: Any, size: Any, stride: Any, qparams: Any,
                requires_grad: Any, backward_hooks: Any) -> Any:  # fmt: skip
        _no_hooks(backward_hooks)
        check_view(storage_numel(storage), offset, tuple(size), tuple(stride))
        if not (isinstance(qparams, tuple) and qparams and isinstance(qparams[0], torch.qscheme)):
            raise refuse("TG401", "quantizer parameters that are not a qscheme tuple")
        if not all(isinstance(x, (int, float, torch.Tensor, list)) for x in qparams[1:]):
            raise refuse("TG401", "quantizer parameters that are not numbers or tensors")
        grad = bool(requires_grad)
        return u._rebuild_qtensor(storage, offset, size, stride, qparams, grad, {})

    def nested(buffer: Any, sizes: Any, strides: Any, offsets: Any) -> Any:
        if not all(isinstance(t, torch.Tensor) for t in (buffer, sizes, strides, offsets)):
            raise refuse("TG401", "nested tensor rebuild from something else than tensors")
        if sizes.dim() != 2 or sizes.shape != strides.shape or offsets.numel() != len(sizes):
            raise refuse("TG402", "nested tensor sizes, strides and offsets disagree")
        for size, stride, at in zip(
            sizes.tolist(), strides.tolist(), offsets.tolist(), strict=True
        ):
            # Each component is a view into the one buffer: it must stay inside it.
            check_view(buffer.numel(), int(at), tuple(size), tuple(stride))
        return u._rebuild_nested_tensor(buffer, sizes, strides, offsets)

    @_buildable
    def generator(device: Any) -> Any:
        # torch.Generator(device), then BUILD restores (seed, offset, state tensor).
        if not isinstance(device, (str, torch.device)):
            raise refuse("TG401", "a generator on something else than a device")
        return torch.Generator(device)

    return {
        "torch._C.Generator": generator,
        "torch._utils._rebuild_sparse_tensor": sparse,
        "torch._utils._rebuild_qtensor": qtensor,
        "torch._utils._rebuild_nested_tensor": nested,
        "torch._utils._rebuild_tensor": v1,
        "torch._utils._rebuild_tensor_v2": v2,
        "torch._utils._rebuild_tensor_v3": v3,
        "torch._utils._rebuild_parameter": parameter,
        "torch._utils._rebuild_parameter_with_state": parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": from_type,
        "torch._utils._rebuild_meta_tensor_no_storage": meta,
        "torch.storage._load_from_bytes": from_bytes,
    }
