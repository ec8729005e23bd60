"""The state a checkpoint restores besides weights and optimizer moments, checked.

A checkpoint carries more than tensors: the scheduler's state (``gamma``,
``base_lrs``, ``last_epoch``...), the optimizer's hyper-parameters (every key
of every param group: ``lr``, ``betas``, ``weight_decay``...), every random
generator's state and the data loader's position.  Replaying a segment from a
checkpoint restores all of it, so sabotage carried *in* it (a raised
``gamma``, a re-seeded generator) replays "clean" from that checkpoint on.
What catches it is the invariant: the state a checkpoint restores must be the
state that recomputing the previous segment ends in.  Where that segment was
not replayed, the checkpoint is held to the digests the ledger recorded when
it was saved.

:func:`flatten` turns each part into ``{name: canonical text}`` so that a
difference is named (``scheduler gamma``, ``rng torch``); :func:`digests` is
what the ledger's checkpoint record keeps of the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

# The parts of a checkpoint's carried state, in the order they are named.
PARTS = ("scheduler", "hyperparameters", "rng", "loader", "data")
MAX_DEPTH = 32  # scheduler states nest a few levels (SequentialLR holds its children)


def _h(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _canonical(value: Any, depth: int = 0) -> str:
    """One text per value, equal exactly when the values are (tuples and lists alike)."""
    if depth > MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        items = sorted((str(k), _canonical(v, depth + 1)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v, depth + 1) for v in value) + "]"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # a tensor: its exact bytes
        import torch

        t = value.detach().cpu().contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return f"tensor({t.dtype},{tuple(t.shape)},{_h(raw)})"
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # a numpy array or scalar
        raw = value.tobytes()
        return f"array({value.dtype},{_h(raw)})"
    return f"{type(value).__name__}:{value!r}"


def _flat(prefix: str, value: Any, out: dict[str, str], depth: int = 0) -> None:
    if isinstance(value, Mapping) and depth < 2:  # name keys two levels down, then as a whole
        for k, v in value.items():
            _flat(f"{prefix} {k}", v, out, depth + 1)
    else:
        out[prefix] = _canonical(value)


def flatten(
    scheduler: Any, optimizer: Any, random_states: Any, loader: Any, data_state: Any = None
) -> dict[str, dict[str, str]]:
    """Named canonical values of each part: ``scheduler`` and ``optimizer`` are state dicts."""
    parts: dict[str, dict[str, str]] = {p: {} for p in PARTS}
    if isinstance(scheduler, Mapping):
        _flat("scheduler", scheduler, parts["scheduler"], 1)
    groups = optimizer.get("param_groups") if isinstance(optimizer, Mapping) else None
    for i, group in enumerate(groups or []):
        if isinstance(group, Mapping):
            for k, v in group.items():
                if k != "params":
                    parts["hyperparameters"][f"optimizer group {i} {k}"] = _canonical(v)
    if isinstance(random_states, Mapping):
        for name, state in random_states.items():
            parts["rng"][f"rng {name}"] = _canonical(state)
    if isinstance(loader, Mapping):
        _flat("data loader", loader, parts["loader"], 1)
    if data_state is not None:
        _flat("data state", data_state, parts["data"], 1)
    return parts


def of_checkpoint(saved: Any) -> dict[str, dict[str, str]]:
    """The carried state of a :class:`~trainguard.monitor.checkpoint.Checkpoint`."""
    data = saved.data if isinstance(saved.data, Mapping) else {}
    return flatten(
        saved.scheduler, saved.optimizer, saved.rng, data.get("loader"), data.get("state")
    )


def digests(parts: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """One digest per part, for the ledger's checkpoint record."""
    out = {}
    for part in PARTS:
        h = hashlib.blake2b(digest_size=16)
        for name, text in sorted((parts.get(part) or {}).items()):
            h.update(f"{name}={text}\n".encode())
        out[part] = h.hexdigest()
    return out


def differences(
    expected: Mapping[str, Mapping[str, str]], restored: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """Names whose value differs (or exists on one side only), across every part."""
    names = []
    for part in PARTS:
        a, b = expected.get(part) or {}, restored.get(part) or {}
        if not a:
            continue  # not known to the replay (no data loader, no data_state, no random
            # states of a fresh build): nothing to hold the checkpoint to
        if part == "rng":
            # Generators both sides have: CUDA's exists only once CUDA was initialised, which
            # a replay process may do where training did not.  A generator missing from the
            # checkpoint is not restored, so the steps after it show any effect.
            names += [n for n in a if n in b and a[n] != b[n]]
            continue
        names += [n for n in dict.fromkeys([*a, *b]) if a.get(n) != b.get(n)]
    return names


def digest_differences(recorded: Mapping[str, Any], restored: Mapping[str, str]) -> list[str]:
    """Parts whose digest differs from the one the ledger recorded (parts it has)."""
    return [p for p in PARTS if isinstance(recorded.get(p), str) and recorded[p] != restored[p]]
