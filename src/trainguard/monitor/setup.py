"""Small helpers a guard needs at start-up: rank and world size, the run key, the ledger."""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainguard.ledger import Ledger


def rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """The given rank and world size, else torch.distributed's, else a single process."""
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return rank or 0, world or 1


def shared_key(world_size: int) -> bytes:
    """A fresh secret key, the same on every rank (rank 0 draws it)."""
    key = secrets.token_bytes(32)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [key]
            dist.broadcast_object_list(box, src=0)
            key = box[0]
    return key


def open_store(ledger: Ledger | str | os.PathLike[str] | None) -> Ledger | None:
    """A ledger object as given, or the one a URL or path names."""
    if ledger is None or not isinstance(ledger, (str, os.PathLike)):
        return ledger
    from trainguard.ledger import open_ledger

    return open_ledger(os.fspath(ledger))


def tensors_in(batch: Any, torch: Any) -> list[Any]:
    """The tensors of a batch (a tensor, or dicts, lists and tuples of them), in a fixed order."""
    if batch is None:
        return []
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [v for k in sorted(batch, key=str) for v in tensors_in(batch[k], torch)]
    if isinstance(batch, (list, tuple)):
        return [v for item in batch for v in tensors_in(item, torch)]
    return []


def total_grad_norm(named_params: list[tuple[str, Any]], torch: Any) -> float:
    """The 2-norm of all gradients together (0.0 when none has a gradient)."""
    # At least float32 (half-precision norms overflow), float64 kept as it is.
    norms = [_norm(p.grad.detach(), torch) for _, p in named_params if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.stack([n.to("cpu", torch.float64) for n in norms]).norm())


def _norm(grad: Any, torch: Any) -> Any:
    # A sparse gradient (nn.Embedding(sparse=True)) is its stored values; a complex one
    # counts by magnitude.  Neither may end the user's step.
    if grad.layout == torch.sparse_coo:
        grad = grad.coalesce().values()
    elif grad.layout != torch.strided:
        grad = grad.values()
    if grad.is_complex():
        grad = grad.abs()
    return grad.norm(dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32)


def scalar(value: Any) -> float | None:
    """A loss (tensor or number) as a float; None stays None."""
    if value is None:
        return None
    return float(value.detach().item() if hasattr(value, "detach") else value)
