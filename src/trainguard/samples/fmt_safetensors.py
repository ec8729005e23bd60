"""safetensors files written with struct and json, and one by the real library.

safetensors cannot carry code, so its malicious samples never fire: they
break the header's invariants (which loaders refuse, and which have been the
place of parser memory bugs) or smuggle a payload into ``__metadata__`` for a
loader that decodes it.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainguard.samples.base import benign, malicious, sh_touch

_ATTACKS = "https://github.com/huggingface/safetensors/tree/main/attacks"


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
    *,
    header_text: str | None = None,
    pad_to: int = 8,
) -> bytes:
    """A file: 8-byte length, JSON header (padded with spaces), then the tensors' bytes
    in order.  ``header_text`` replaces the generated header verbatim."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = (
        json.dumps(header, separators=(",", ":")) if header_text is None else header_text
    ).encode()
    text += b" " * (-len(text) % pad_to)
    return struct.pack("<Q", len(text)) + text + b"".join(d for _, _, d in tensors.values())


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Call:
    """Pickles to ``func(*args)``: the payload a metadata-decoding loader would run."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


@malicious(
    "safetensors-metadata-pickle",
    "safetensors whose __metadata__ holds a base64 pickle",
    "payload for loaders that decode metadata (safetensors itself never runs it)",
    loader="safetensors",
    fires=False,
    expect="medium",
)
def metadata_pickle(out: Path, canary: Path) -> Path:
    payload = base64.b64encode(pickle.dumps(_Call(os.system, sh_touch(canary)))).decode()
    return _write(
        out / "meta-pickle.safetensors",
        safetensors_bytes(
            {"w": ("F32", [2], _f32(1, 2))}, {"format": "pt", "training_state": payload}
        ),
    )


@malicious(
    "safetensors-metadata-python",
    "safetensors whose __metadata__ holds Python code",
    "code-like metadata for a loader that evals a config string",
    loader="safetensors",
    fires=False,
    expect="medium",
)
def metadata_python(out: Path, canary: Path) -> Path:
    code = f"__import__('os').system({sh_touch(canary)!r})"
    return _write(
        out / "meta-python.safetensors",
        safetensors_bytes(
            {"w": ("F32", [2], _f32(1, 2))}, {"format": "pt", "post_load_hook": code}
        ),
    )


@malicious(
    "safetensors-overlapping-offsets",
    "safetensors tensors sharing bytes",
    "offsets that overlap (the reference loader refuses them)",
    advisory=_ATTACKS,
    loader="safetensors",
    fires=False,
    expect="high",
)
def overlapping(out: Path, canary: Path) -> Path:
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    )
    return _write(
        out / "overlap.safetensors", safetensors_bytes({}, header_text=header) + _f32(0, 1, 2)
    )


@malicious(
    "safetensors-header-past-end",
    "safetensors header length beyond the file",
    "a length field a parser may trust for allocation",
    advisory=_ATTACKS,
    loader="safetensors",
    fires=False,
    expect="high",
)
def header_past_end(out: Path, canary: Path) -> Path:
    return _write(out / "past-end.safetensors", struct.pack("<Q", 50_000_000) + b'{"a":1}')


@malicious(
    "safetensors-duplicate-key",
    "safetensors header naming a tensor twice",
    "readers disagree on the winner; the library silently takes the last",
    loader="safetensors",
    fires=False,
    expect="high",
)
def duplicate_key(out: Path, canary: Path) -> Path:
    entry = '"w":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}'
    header = "{" + entry % (1, 4) + "," + entry % (2, 8) + "}"
    return _write(
        out / "duplicate.safetensors", safetensors_bytes({}, header_text=header) + _f32(1, 2)
    )


@malicious(
    "safetensors-shape-mismatch",
    "safetensors shape that needs more bytes than given",
    "sizes inconsistent with shape and dtype",
    advisory=_ATTACKS,
    loader="safetensors",
    fires=False,
    expect="high",
)
def shape_mismatch(out: Path, canary: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 8]}})
    return _write(out / "shape.safetensors", safetensors_bytes({}, header_text=header) + _f32(1, 2))


@benign(
    "safetensors-handmade",
    "safetensors written with struct and json",
    "several dtypes, metadata",
    loader="safetensors",
)
def handmade(out: Path, canary: Path) -> Path:
    return _write(
        out / "handmade.safetensors",
        safetensors_bytes(
            {
                "embed.weight": ("F32", [2, 3], _f32(*range(6))),
                "embed.bias": ("F16", [3], struct.pack("<3e", 0.5, 1.0, 1.5)),
                "step": ("I64", [], struct.pack("<q", 1000)),
            },
            {"format": "pt", "description": "tiny model; trained with python 3.11 and PyTorch"},
        ),
    )


@benign(
    "safetensors-library",
    "safetensors written by safetensors.numpy.save_file",
    "the reference writer",
    loader="safetensors",
    requires=("safetensors", "numpy"),
)
def library(out: Path, canary: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path = out / "library.safetensors"
    save_file(
        {
            "layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "layer.mask": np.array([True, False, True]),
        },
        str(path),
        metadata={"format": "np"},
    )
    return path
