"""Generated TorchScript archives whose code reaches a file operator by any spelling.

``torch.jit.load`` compiles ``code/**/*.py`` with TorchScript's own lexer, which
accepts what Python's does: spaces round a dot, a call split over lines inside
brackets or by a backslash, comments between them, and the operator under
``torch.ops.aten`` or ``ops.aten`` as well as ``torch``.  Each mutant is an honest
scripted module whose code is then respelled; the operator is ``aten::from_file``
with ``shared=True``, which creates the canary (a file map, no process).
``forward`` mutants fire at the first forward pass, ``__setstate__`` ones while
``torch.jit.load`` runs.  Building needs torch (``torch.jit.script`` compiles
our own module here; nothing from a file is loaded).
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

from trainguard.samples.base import Sample

# How `torch.from_file(` is written in the archive's code.
SPELLINGS: dict[str, str] = {
    "plain": "torch.from_file(",
    "spaced": "torch . from_file (",
    "backslash": "torch.\\\n        from_file(",
    "ops": "ops.aten.from_file(",
    "ops-spaced": "ops .  aten\t. from_file(",
    "bracket-split": "(torch  # the map\n        .from_file)(",
}
WHERE = ("forward", "setstate")
# The loader: the first forward pass runs `forward`; `__setstate__` runs on load.
LOADER = "torch-jit-forward"

_FORWARD_SRC = """
import torch
class M(torch.nn.Module):
    def __init__(self, p: str):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.p = p
    def forward(self, x):
        t = torch.from_file(self.p, True, 1, dtype=torch.uint8)
        return self.lin(x) + t[0:1].float() * 0
"""
_SETSTATE_SRC = """
import torch
class M(torch.nn.Module):
    def __init__(self, p: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.p = p
    def forward(self, x):
        return x * self.w
    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.p, self.training)
    @torch.jit.export
    def __setstate__(self, st: tuple[torch.Tensor, str, bool]):
        self.p = st[1]
        t = torch.from_file(self.p, True, 1, dtype=torch.uint8)
        self.w = st[0] + t[0:1].float() * 0
        self.training = st[2]
"""


def _scripted(where: str, folder: Path, canary: Path) -> bytes:
    import torch  # building only: the scanner never imports torch

    namespace: dict[str, object] = {}
    src = _FORWARD_SRC if where == "forward" else _SETSTATE_SRC
    # Our own class, compiled from a file so that TorchScript can read its source.
    module_path = folder / f"_jit_{where}.py"
    module_path.write_text(src)
    exec(compile(src, str(module_path), "exec"), namespace)  # our own source
    cls = namespace["M"]
    assert isinstance(cls, type)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(cls(str(canary))), buf)
    return buf.getvalue()


def respell(archive: bytes, spelling: str) -> bytes:
    """``archive`` with every ``torch.from_file(`` in its code written as ``spelling``."""
    out = io.BytesIO()
    found = False
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                found = found or b"torch.from_file(" in data
                data = data.replace(b"torch.from_file(", SPELLINGS[spelling].encode())
            zout.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    if not found:
        raise ValueError("the archive's code never calls torch.from_file")
    return out.getvalue()


def jit_mutant(spelling: str, where: str) -> Sample:
    ident = f"jit-{where}-{spelling}"

    def build(folder: Path, canary: Path) -> Path:
        path = folder / f"{ident}.pt"
        path.write_bytes(respell(_scripted(where, folder, canary), spelling))
        return path

    title = f"TorchScript {where} calls from_file spelled {spelling!r}"
    return Sample(ident, title, title, "", LOADER, True, True, "critical", ("torch",), build)


def draw_jit(rng: random.Random) -> Sample:
    return jit_mutant(rng.choice(sorted(SPELLINGS)), rng.choice(WHERE))
