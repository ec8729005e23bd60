"""``trainguard convert``: a pickle checkpoint to safetensors plus a JSON sidecar.

The input is read with the safe loader (so a malicious file is refused, never
run).  Every tensor or array goes into the safetensors file under its dotted
path (``model.layer.weight``, ``optimizer.state.0.exp_avg``); everything else
(epochs, hyper-parameters, random states as lists) goes into the JSON sidecar,
where tensors are replaced by ``{"__tensor__": "dotted.path"}``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainguard.errors import UsageError
from trainguard.loader.safeload import load
from trainguard.scanner import Policy

_DTYPES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _tensor_bytes(value: Any) -> tuple[str, list[int], bytes] | None:
    """(safetensors dtype, shape, little-endian C-order bytes) for a tensor or array."""
    kind = type(value).__module__.split(".")[0]
    if kind == "torch" and hasattr(value, "detach"):
        t = value.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise UsageError(f"tensor dtype {dtype} has no safetensors equivalent")
        import torch

        # reshape: a 0-dim tensor (Adam's step) cannot be viewed as bytes directly
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return _DTYPES[dtype], list(t.shape), raw
    if kind == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        import numpy as np

        arr = np.ascontiguousarray(value)
        name = arr.dtype.name
        if name not in _DTYPES or arr.dtype.byteorder == ">":
            return None  # object or exotic arrays stay in JSON as lists
        return _DTYPES[name], list(arr.shape), arr.tobytes()
    return None


def _split(value: Any, path: str, tensors: dict[str, tuple[str, list[int], bytes]]) -> Any:
    packed = _tensor_bytes(value)
    if packed is not None:
        tensors[path] = packed
        return {"__tensor__": path}
    prefix = f"{path}." if path else ""
    if isinstance(value, Mapping):
        return {str(k): _split(v, f"{prefix}{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {"__bytes_hex__": value.hex()}
    if hasattr(value, "tolist"):  # numpy object arrays, scalars
        return _split(value.tolist(), path, tensors)
    return {"__repr__": repr(value)[:500]}


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for an 8-byte aligned data section
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name in sorted(tensors):
            out.write(tensors[name][2])
    os.replace(tmp, path)


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    policy: Policy | None = None,
    strict: bool = False,
) -> tuple[Path, Path]:
    """Write ``OUT.safetensors`` and ``OUT.json``; returns both paths."""
    data = load(src, policy=policy, map_location="cpu", strict=strict)
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    rest = _split(data, "", tensors)
    base = Path(out)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    st_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    base.parent.mkdir(parents=True, exist_ok=True)  # `convert ckpt.pt out/model` makes out/
    write_safetensors(st_path, tensors, {"format": "pt", "converted_by": "trainguard"})
    json_path.write_text(
        json.dumps({"source": os.fspath(src), "tensors": st_path.name, "structure": rest}, indent=1)
        + "\n"
    )
    return st_path, json_path
