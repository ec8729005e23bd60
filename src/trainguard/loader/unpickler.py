"""An allowlist unpickler: every import a file asks for is answered by us.

``find_class`` returns our own rebuild functions for tensors and storages
(:mod:`trainguard.loader.tensors`), plain containers, and numpy's own array
reconstructors (numpy rebuilds arrays from raw bytes without running code
from the file).  Anything else is refused with TG401, unless the user's policy
allows it explicitly, in which case it is imported for real: a decision to
trust that global's author.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import importlib
import io
import pickle
from collections.abc import Callable
from typing import Any

from trainguard.loader import tensors
from trainguard.scanner.picklevm.names import DENIED_MODULES, DENIED_NAMES, _in_module_set

PersistentLoad = Callable[[Any], Any]

_BUILTINS = (
    "set frozenset list dict tuple int float complex bool bytes bytearray str slice range object"
).split()

# Names resolved lazily (torch/numpy may be absent) to real, vetted objects.
_REAL: frozenset[str] = frozenset(
    [
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        "torch.strided",
        "torch.sparse_coo",
        "torch.sparse_csr",
        "torch.contiguous_format",
        "torch.channels_last",
        "torch.channels_last_3d",
        "torch.preserve_format",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random.mtrand.RandomState",
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        *(
            f"torch.{d}"
            for d in (
                "float32 float float64 double float16 half bfloat16 "
                "complex64 complex128 uint8 int8 int16 short int32 int "
                "int64 long bool"
            ).split()
        ),
        *(
            f"numpy.{d}"
            for d in (
                "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
                "float16 float32 float64 complex64 complex128"
            ).split()
        ),
    ]
)

_OURS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": lambda storage, offset, size, stride: tensors.rebuild_tensor(
        storage, offset, size, stride
    ),
    "torch._utils._rebuild_tensor_v2": tensors.rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": tensors.rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": tensors.rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": tensors.rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": tensors.rebuild_from_type_v2,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": collections.defaultdict,
    "collections.Counter": collections.Counter,
    "collections.deque": collections.deque,
    "copyreg._reconstructor": copyreg._reconstructor,  # type: ignore[attr-defined]
    "_codecs.encode": __import__("_codecs").encode,
    **{f"builtins.{n}": getattr(builtins, n) for n in _BUILTINS},
    **{f"torch.{n}": tensors.StorageType(n) for n in tensors.STORAGE_TYPES},
}


def _resolve_real(qualified: str) -> Any:
    module, _, name = qualified.rpartition(".")
    obj: Any = importlib.import_module(module)
    return getattr(obj, name)


class SafeUnpickler(pickle.Unpickler):
    def __init__(
        self,
        data: bytes,
        *,
        persistent_load: PersistentLoad | None = None,
        allow: frozenset[str] = frozenset(),
        source: str = "",
    ) -> None:
        super().__init__(io.BytesIO(data), encoding="ASCII")
        self._persistent = persistent_load
        self._allow = allow
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        mapped = _compat_pickle.NAME_MAPPING.get((module, name))
        if mapped:
            module, name = mapped
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in _OURS:
            return _OURS[qualified]
        if qualified in _REAL:
            return _resolve_real(qualified)
        denied = qualified in DENIED_NAMES or _in_module_set(qualified, DENIED_MODULES)
        if (
            not denied
            and "." not in name
            and (qualified in self._allow or _in_module_set(qualified, self._allow))
        ):
            return super().find_class(module, name)
        raise tensors.refuse(
            "TG401", f"{qualified} is outside the safe loader's allowlist", self._source, qualified
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise tensors.refuse(
                "TG401", "persistent id outside a PyTorch checkpoint", self._source
            )
        return self._persistent(pid)


def safe_loads(
    data: bytes,
    *,
    persistent_load: PersistentLoad | None = None,
    allow: frozenset[str] = frozenset(),
    source: str = "",
) -> Any:
    return SafeUnpickler(data, persistent_load=persistent_load, allow=allow, source=source).load()
