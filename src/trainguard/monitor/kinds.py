"""Tensor kinds a check can read, and what a check does with the others.

The checks read tensors as flat, dense, real numbers (keyed samples, dot
products, sums of words).  A sparse gradient (``nn.Embedding(sparse=True)``),
a nested, meta or quantized tensor, or a complex one has no such view: a check
that met one used to raise inside the user's backward or ``optimizer.step``
and end the run.  A check never ends training: it skips the tensors it cannot
read and says so once (TG1315, info), naming them, so a skipped tensor is a
recorded gap and never a silent "clean".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def unreadable(t: Any) -> str | None:
    """Why a check cannot read ``t`` as dense real numbers; None when it can."""
    import torch

    if getattr(t, "is_nested", False):
        return "nested"
    if getattr(t, "is_meta", False):
        return "meta"
    if getattr(t, "is_quantized", False):
        return "quantized"
    layout = getattr(t, "layout", torch.strided)
    if layout != torch.strided:
        return str(layout).removeprefix("torch.")  # sparse_coo, sparse_csr, ...
    if t.is_complex():
        return "complex"
    if not t.is_floating_point():
        return f"dtype {str(t.dtype).removeprefix('torch.')}"
    return None


class Unchecked:
    """The tensors one check skipped, each with its reason; new ones are reported once."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self._reported: set[str] = set()

    def add(self, name: str, reason: str) -> None:
        self.reasons.setdefault(name, reason)

    def fresh(self) -> dict[str, str]:
        """The tensors skipped since the last call (to name in one note)."""
        new = {n: r for n, r in self.reasons.items() if n not in self._reported}
        self._reported.update(new)
        return new


def dense_parts(named: Iterable[tuple[str, Any]], skipped: Unchecked) -> list[tuple[str, Any]]:
    """Tensors as dense parts a fingerprint can read: a sparse one as its indices and
    values (views, no copy), a quantized one as its integers; the rest of the kinds
    no fingerprint reads go to ``skipped``."""
    import torch

    out = []
    for name, t in named:
        layout = getattr(t, "layout", torch.strided)
        if layout == torch.sparse_coo:
            out += [(f"{name}.indices", t._indices()), (f"{name}.values", t._values())]
        elif layout in (torch.sparse_csr, torch.sparse_bsr):
            out += [(f"{name}.crow", t.crow_indices()), (f"{name}.col", t.col_indices())]
            out.append((f"{name}.values", t.values()))
        elif layout in (torch.sparse_csc, torch.sparse_bsc):
            out += [(f"{name}.ccol", t.ccol_indices()), (f"{name}.row", t.row_indices())]
            out.append((f"{name}.values", t.values()))
        elif getattr(t, "is_quantized", False):
            out.append((f"{name}.int", t.int_repr()))
        elif getattr(t, "is_nested", False) or getattr(t, "is_meta", False):
            skipped.add(name, "nested" if t.is_nested else "meta")
        else:
            out.append((name, t))
    return out
