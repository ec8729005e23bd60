"""Generated pickles whose callee hides behind an allowlisted helper or a class's state.

Two families the red team found (issue 11):

- ``callthrough``: a helper that calls one of its arguments
  (``copyreg._reconstructor``'s base, ``copy._reconstruct``'s func) is handed
  the callee through a function that returns its argument (``max``, ``min``,
  ``sum([], x)``), so no REDUCE ever names it.  The callee is joblib's
  ``Memory``, whose ``__init__`` creates the canary as its cache folder.
- ``nested``: torch's ``_DataPipeSerializationWrapper.__setstate__`` runs
  ``pickle.loads`` on its state; the inner pickle's bytes are built at load
  time (``bytes([...])``, ``bytearray([...])``, ``_codecs.encode``) or plain,
  and the state is a tuple or a dict whose keys the method unpacks.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from trainguard.samples.base import Sample

HELPERS = ("reconstructor", "copy_reconstruct")
LAUNDER = ("max", "min", "sum")
ENCODINGS = ("bytes", "bytearray", "codecs", "raw")
SHAPES = ("dict_keys", "tuple")


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _laundered(launder: str, g: bytes) -> bytes:
    if launder == "sum":
        return _g("builtins", "sum") + b"(]" + g + b"tR"
    return _g("builtins", launder) + b"(" + g + b"l\x85R"


def callthrough(helper: str, launder: str) -> Sample:
    ident = f"callthrough-{helper}-{launder}"

    def build(folder: Path, canary: Path) -> Path:
        memory = _g("joblib.memory", "Memory")
        callee = _laundered(launder, memory)
        if helper == "reconstructor":
            body = _g("copyreg", "_reconstructor") + b"(" + memory + callee + _u(str(canary))
        else:  # copy._reconstruct(x, memo, func, args) calls func(*args)
            body = _g("copy", "_reconstruct") + b"(NN" + callee + b"(" + _u(str(canary)) + b"t"
        path = folder / f"{ident}.pkl"
        path.write_bytes(b"\x80\x02" + body + b"tR0}" + _u("epoch") + b"K\x03s.")
        return path

    title = f"joblib Memory called by {helper} through builtins.{launder}"
    return Sample(ident, title, title, "", "pickle", True, True, "high", ("joblib",), build)


def _encoded(encoding: str, data: bytes) -> bytes:
    if encoding == "raw":
        return b"C" + bytes([len(data)]) + data if len(data) < 256 else b"B" + data
    if encoding == "codecs":
        return _g("_codecs", "encode") + b"(" + _u(data.decode("latin-1")) + _u("latin1") + b"tR"
    ints = b"](" + b"".join(b"K" + bytes([c]) for c in data) + b"e"
    return _g("builtins", encoding) + b"(" + ints + b"tR"


def nested(encoding: str, shape: str) -> Sample:
    ident = f"nested-datapipe-{encoding}-{shape}"

    def build(folder: Path, canary: Path) -> Path:
        cmd = f"touch {canary}"
        inner = b"cos\nsystem\n(" + _u(cmd) + b"tR."
        value = _encoded(encoding, inner)
        if shape == "dict_keys":  # `value, use_dill = state` unpacks a dict's two keys
            if encoding == "bytearray":  # a key must hash: bytes(bytearray([...]))
                value = _g("builtins", "bytes") + b"(" + value + b"tR"
            state = b"}(" + value + b"K\x00\x89K\x00u"
        else:
            state = b"(" + value + b"\x89t"
        cls = _g("torch.utils.data.datapipes.datapipe", "_DataPipeSerializationWrapper")
        body = cls + b")\x81" + state + b"b0}" + _u("epoch") + b"K\x03s."
        path = folder / f"{ident}.pkl"
        path.write_bytes(b"\x80\x02" + body)
        return path

    title = f"datapipe wrapper unpickling {encoding} bytes from a {shape} state"
    return Sample(ident, title, title, "", "pickle", True, True, "high", ("torch",), build)


def draw_callthrough(rng: random.Random) -> Sample:
    if rng.random() < 0.5:
        return callthrough(rng.choice(HELPERS), rng.choice(LAUNDER))
    return nested(rng.choice(ENCODINGS), rng.choice(SHAPES))
