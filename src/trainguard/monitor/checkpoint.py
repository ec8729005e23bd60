"""Checkpoints of a watched run: everything ``trainguard replay`` needs to re-run from them.

A checkpoint is one ``torch.save`` file holding only what
:func:`trainguard.load` rebuilds without running code: dicts, lists, tuples,
numbers, strings and tensors.  Contents (format ``trainguard-checkpoint/1``):

``run_id``, ``rank``, ``step``
    ``step`` is the position: the number of steps done, so the next step
    to run is ``step``.
``model``, ``optimizer``, ``scheduler``
    their ``state_dict()`` (``scheduler`` None without one).
``rng``
    torch's CPU generator, CUDA's (one per device, when CUDA is in use),
    numpy's global generator and Python's ``random``.
``data``
    the position in the data: ``state`` is what the caller passed as
    ``data_state``; ``loader`` what could be read from the guard's data loader
    (its and its sampler's generator states, the sampler's epoch, the
    batches per epoch).
``conditions``
    :func:`trainguard.monitor.conditions.gather` at save time.
``shards``
    under FSDP2, where each rank's slice of every sharded tensor in ``model`` and
    ``optimizer`` sits (each rank saves its own slice, as a plain tensor); else None.

The ledger gets a ``checkpoint`` record (on the rank's stream, at ``step``)
with the file's BLAKE3 digest, its size and name, digests of the
parameters, optimizer state and random states that were saved, and of the
rest of the state it carries, the model's buffers included
(:mod:`trainguard.monitor.carried`).
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.monitor import carried, conditions, rng, sharding
from trainguard.monitor.fingerprint import optimizer_tensors

FORMAT = "trainguard-checkpoint/1"
HASH_CHUNK = 1 << 20
MAX_DEPTH = 64  # nesting of a saved object; state dicts are a few levels deep
PARTS_SHARDED = ("model", "optimizer")  # the entries whose DTensors are saved as local slices


class CheckpointError(TrainguardError):
    """A checkpoint could not be written or read back as one."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as :func:`read` gives it back."""

    path: str
    run_id: str
    rank: int
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]
    data: dict[str, Any]
    conditions: dict[str, Any]
    # Sharded runs (FSDP2): where each saved slice sits, by its path in ``model`` and
    # ``optimizer`` (:func:`trainguard.monitor.sharding.local_state`); None when unsharded.
    shards: dict[str, Any] | None = None


def save(guard: Any, path: str | os.PathLike[str], *, data_state: Any = None) -> dict[str, Any]:
    """Write ``guard``'s run state to ``path`` and record it in the ledger (see the module)."""
    import torch

    if guard._pending is not None:
        raise CheckpointError(
            "checkpoint taken between optimizer.step() and guard.step(): "
            "call guard.checkpoint after guard.step"
        )
    path = os.fspath(path)
    # Under FSDP2 each rank saves its own slice of every DTensor, as a plain tensor.
    model, model_layout = sharding.local_state(guard.model.state_dict())
    optimizer, optimizer_layout = sharding.local_state(guard.optimizer.state_dict())
    content = {
        "format": FORMAT,
        "run_id": guard.run_id,
        "rank": guard.rank,
        "step": guard.step_index,
        "model": model,
        "optimizer": optimizer,
        "scheduler": guard.scheduler.state_dict() if guard.scheduler is not None else None,
        "rng": random_states(),
        "data": {
            "step": guard.step_index,
            "state": data_state,
            "loader": loader_state(guard.dataloader),
        },
        "conditions": conditions.gather(guard.model),
        "shards": (
            {"model": model_layout, "optimizer": optimizer_layout}
            if model_layout or optimizer_layout
            else None
        ),
    }
    for where, value in _walk(content, "checkpoint", 0):
        if not _loadable(value, torch):
            raise CheckpointError(
                f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                "trainguard.load would refuse: keep data_state (and scheduler state) to "
                "dicts, lists, numbers, strings and tensors"
            )
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(content, tmp)
        digest, size = file_digest(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    params = guard.fp.fingerprint(guard.named_params)
    opt = guard.fp.fingerprint(optimizer_tensors(guard.optimizer))
    payload = {
        "format": FORMAT,
        "path": os.path.abspath(path),
        "name": os.path.basename(path),
        "blake3": digest,
        "size": size,
        "step": guard.step_index,
        "params": params.digest,
        "optimizer": opt.digest,
        "plain": {"params": params.plain, "optimizer": opt.plain},
        "rng": rng.state_digests(),
        # Scheduler, hyper-parameters, random and data states as saved: what a replay
        # that did not recompute the previous segment holds this checkpoint to.
        "carried": carried.digests(
            carried.flatten(
                content["scheduler"],
                content["optimizer"],
                content["rng"],
                content["data"]["loader"],
                data_state,
                carried.buffers_of(model, (n for n, _ in guard.named_params)),
            )
        ),
        "conditions": content["conditions"],
    }
    guard._record("checkpoint", payload)
    return payload


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """BLAKE3 hex digest and size of a file."""
    from blake3 import blake3

    h = blake3()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint loaded through :func:`trainguard.load` (never plain ``torch.load``)."""
    from trainguard.loader import load

    path = os.fspath(path)
    content = load(path, map_location="cpu")
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a trainguard checkpoint (no format {FORMAT!r})")
    fields: dict[str, type | tuple[type, ...]] = {
        "run_id": str,
        "rank": int,
        "step": int,
        "model": dict,
        "optimizer": dict,
        "scheduler": (dict, type(None)),
        "rng": dict,
        "data": dict,
        "conditions": dict,
    }
    for name, kind in fields.items():
        if not isinstance(content.get(name), kind):
            raise CheckpointError(f"{path}: entry {name!r} is missing or of the wrong type")
    shards = content.get("shards")
    if shards is not None and not (
        isinstance(shards, dict) and all(isinstance(shards.get(k), dict) for k in PARTS_SHARDED)
    ):
        raise CheckpointError(f"{path}: entry 'shards' is of the wrong type")
    return Checkpoint(path=path, shards=shards, **{k: content[k] for k in fields})


# -- random states -------------------------------------------------------------------


def random_states() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    legacy: Any = np.random.get_state(legacy=True)  # a tuple while the generator is MT19937
    name, keys, pos, has_gauss, cached = legacy
    state["numpy"] = {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def restore_random_states(state: dict[str, Any]) -> None:
    """Put back every random state :func:`random_states` saved."""
    import torch

    try:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        cuda = state.get("cuda")
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np_state = state.get("numpy")
        if np_state is not None:
            import numpy as np

            np.random.set_state(
                (
                    np_state["bit_generator"],
                    np_state["keys"].numpy().astype(np.uint32),
                    np_state["pos"],
                    np_state["has_gauss"],
                    np_state["cached_gaussian"],
                )
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's random states cannot be restored: {exc}") from None


# -- the data loader -------------------------------------------------------------------


def loader_state(loader: Any) -> dict[str, Any] | None:
    """What can be read of a data loader's position without iterating it."""
    if loader is None:
        return None
    import torch

    out: dict[str, Any] = {}
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        out["generator"] = gen.get_state()
    sampler = getattr(loader, "sampler", None)
    sampler_gen = getattr(sampler, "generator", None)
    if isinstance(sampler_gen, torch.Generator) and sampler_gen is not gen:
        out["sampler_generator"] = sampler_gen.get_state()
    epoch = getattr(sampler, "epoch", None)
    if isinstance(epoch, int):
        out["sampler_epoch"] = epoch
    try:
        out["batches_per_epoch"] = len(loader)
    except TypeError:  # an iterable dataset without a length
        pass
    return out


# -- what trainguard.load reads back ---------------------------------------------------------


def _walk(value: Any, where: str, depth: int) -> Iterator[tuple[str, Any]]:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{where}: nested more than {MAX_DEPTH} levels")
    yield where, value
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}")
            yield from _walk(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}[{i}]", depth + 1)


_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, OrderedDict)


def _loadable(value: Any, torch: Any) -> bool:
    """Exact types only: a subclass (an enum, a named tuple) pickles as its own class."""
    kind = type(value)
    if kind in _PLAIN or kind in (torch.Tensor, torch.nn.Parameter, torch.Size):
        return True
    if isinstance(value, (torch.dtype, torch.device)):
        return True
    try:
        import numpy as np
    except ImportError:
        return False
    if kind is np.ndarray:
        return bool(value.dtype != object)
    return isinstance(value, np.generic) and not isinstance(value, np.object_)
