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

# The parts of a checkpoint's carried state, in the order they are named.  ``buffers``: every
# entry of the model's state dict that is not a parameter (BatchNorm's running statistics,
# an alias of a tied weight): load_state_dict restores them, and the weights' fingerprints
# do not cover them.
PARTS = ("scheduler", "hyperparameters", "rng", "loader", "data", "buffers")
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
    scheduler: Any,
    optimizer: Any,
    random_states: Any,
    loader: Any,
    data_state: Any = None,
    buffers: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, str]]:
    """Named canonical values of each part: ``scheduler`` and ``optimizer`` are state dicts,
    ``buffers`` the model's non-parameter state (:func:`buffers_of`)."""
    parts: dict[str, dict[str, str]] = {p: {} for p in PARTS}
    for name, value in (buffers or {}).items():
        parts["buffers"][f"model {name}"] = _canonical(value)
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


def buffers_of(model_state: Mapping[str, Any], param_names: Any) -> dict[str, Any]:
    """The entries of a model's state dict that are not parameters (by name): what a
    checkpoint restores besides the fingerprinted weights."""
    # The ledger names a parameter this rank holds a shard of (FSDP2) by its slice,
    # ``0.weight[0:7]``: its state dict entry is ``0.weight`` (no module name holds "[").
    params = {str(n).split("[", 1)[0] for n in param_names}
    return {str(k): v for k, v in model_state.items() if k not in params}


def of_checkpoint(saved: Any, param_names: Any = None) -> dict[str, dict[str, str]]:
    """The carried state of a :class:`~trainguard.monitor.checkpoint.Checkpoint`;
    ``param_names`` (the run's, from its run-start record): its buffers are held too."""
    data = saved.data if isinstance(saved.data, Mapping) else {}
    buffers = buffers_of(saved.model, param_names) if param_names is not None else None
    return flatten(
        saved.scheduler,
        saved.optimizer,
        saved.rng,
        data.get("loader"),
        data.get("state"),
        buffers,
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
    # Parts only replay holds (explain/replay/datawitness.py): the optimizer's state at the
    # run's start, and the data_state entries whose generators replay found (held where the
    # expected side has them, against the checkpoint's ``data`` part).
    extra = [p for p in expected if p not in PARTS]
    for part in (*PARTS, *extra):
        a, b = expected.get(part) or {}, restored.get(part) or {}
        if part == "data generators":
            b = restored.get("data") or {}
            names += [n for n in a if a[n] != b.get(n)]
            continue
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


# -- random generators: re-seeded, or only moved on ------------------------------------------

MT_FRESH_POSITION = 624  # where Python's and NumPy's MT19937 stand right after seeding
TORCH_CPU_STATE_BYTES = 5056  # torch's CPU generator state; its first 8 bytes are the seed
MAX_DRAWN_WORDS = 1 << 16  # Python words an honest loop may draw between a step and a save
MT_INIT_MULTIPLIER = 1812433253  # init_genrand's recurrence (Matsumoto and Nishimura)
MT_INIT_BY_ARRAY_FIRST = 0x80000000  # the first key word init_by_array always leaves


def reseeded(replayed: Any, saved: Any) -> bool:
    """Whether the generator state ``saved`` shows a re-seed that ``replayed`` (the state
    recomputation reached at the same position) does not.

    Honest loops draw random numbers between a step and a save (an evaluation that samples
    batches): that moves a generator on, but never changes the seed torch keeps in its
    state, and never puts a generator back to a freshly seeded state.  A state this cannot
    read counts as re-seeded (fail closed).
    """
    import torch

    if isinstance(saved, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in saved):
        if not isinstance(replayed, (list, tuple)) or len(replayed) != len(saved):
            return True
        return any(reseeded(a, b) for a, b in zip(replayed, saved, strict=True))  # CUDA's
    if isinstance(saved, torch.Tensor):
        if not isinstance(replayed, torch.Tensor) or saved.numel() < 8 or replayed.numel() < 8:
            return True
        seed_a, seed_b = _seed(replayed), _seed(saved)
        if seed_a != seed_b:
            return True
        if saved.numel() != TORCH_CPU_STATE_BYTES:
            return False  # a CUDA state (seed, offset): the seed is all that says re-seeded
        fresh = torch.Generator().manual_seed(seed_b).get_state()
        return bool(torch.equal(saved, fresh) and not torch.equal(replayed, fresh))
    if isinstance(saved, (list, tuple)):  # Python's: is it reachable by drawing from ours?
        return not _python_reachable(replayed, saved)
    # NumPy's: re-seeded only if the key is one that seeding wrote.  The position alone
    # (624) would not do: honest drawing lands there once in 624 words, so a loop drawing
    # before a save was flagged once in ~624 saves.  A state this cannot read: re-seeded.
    return not _numpy_equal(replayed, saved) and _numpy_fresh(saved)


def freshly_seeded(state: Any) -> bool:
    """Whether Python's or NumPy's saved generator ``state`` is one that seeding wrote and
    no draw has moved since: only seeding reaches it, so where the state the run had a
    moment before differs (the record of the step before a save), it was re-seeded.

    Python's ``random.seed`` always runs ``init_by_array``, which leaves the first key word
    0x80000000 and the position at 624; its first draw twists the key, so an honest state
    that was drawn from has that word with probability 2**-32.  NumPy's: :func:`_numpy_fresh`.
    """
    if isinstance(state, Mapping):
        return _numpy_fresh(state)
    if _mt_position(state) != MT_FRESH_POSITION:
        return False
    internal = state[1]
    return (
        len(internal) == MT_FRESH_POSITION + 1
        and (int(internal[0]) & 0xFFFFFFFF) == MT_INIT_BY_ARRAY_FIRST
    )


def _numpy_equal(a: Any, b: Any) -> bool:
    """Whether two of NumPy's saved states are the same generator state."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return False
    try:
        keys_equal = [int(k) for k in a["keys"]] == [int(k) for k in b["keys"]]
    except (KeyError, TypeError, ValueError):
        return False
    return keys_equal and all(a.get(k) == b.get(k) for k in ("pos", "has_gauss", "cached_gaussian"))


def _numpy_fresh(state: Any) -> bool:
    """Whether NumPy's saved MT19937 key is one that ``np.random.seed`` wrote and no draw
    has twisted since (draws before the next twist only move the position, so a re-seed
    followed by a few draws is caught too).

    An integer seed runs ``init_genrand``: the whole key follows from its first word, so
    this is decided exactly.  Array seeds run ``init_by_array`` and ``seed(None)`` fills
    the key from OS entropy; both set the first word to 0x80000000 (``seed(None)`` leaves
    the position where it was).  A twisted key starts with that word with probability
    2**-32, which is the whole false-alarm chance of an honest save.
    """
    if not isinstance(state, Mapping) or _mt_position(state) is None:
        return True
    try:
        words = [int(k) & 0xFFFFFFFF for k in state["keys"]]
    except (KeyError, TypeError, ValueError):
        return True
    if len(words) != MT_FRESH_POSITION:
        return True
    if words[0] == MT_INIT_BY_ARRAY_FIRST:
        return True
    x = words[0]
    for i in range(1, MT_FRESH_POSITION):
        x = (MT_INIT_MULTIPLIER * (x ^ (x >> 30)) + i) & 0xFFFFFFFF
        if x != words[i]:
            return False
    return True


def _python_reachable(replayed: Any, saved: Any) -> bool:
    """Whether drawing at most MAX_DRAWN_WORDS words from ``replayed`` gives ``saved``."""
    import random

    try:
        target = (saved[0], tuple(saved[1]), saved[2])
        gen = random.Random()  # noqa: S311 - replays a recorded state, draws nothing secret
        gen.setstate((replayed[0], tuple(replayed[1]), replayed[2]))
    except (TypeError, ValueError, IndexError):
        return False
    if gen.getstate() == target:
        return True
    # The position (last item) moves one per 32-bit word and wraps from 624 to 1, so only
    # every 624th count of words can land on the target's position: look only there.
    start, goal = int(gen.getstate()[1][-1]), int(target[1][-1])
    words = goal - start if goal > start else MT_FRESH_POSITION - start + goal
    drawn = 0
    while 0 < words <= MAX_DRAWN_WORDS:
        gen.getrandbits(32 * (words - drawn))  # that many words, in one call
        drawn = words
        if gen.getstate() == target:
            return True
        words += MT_FRESH_POSITION
    return False


def _seed(state: Any) -> int:
    return int.from_bytes(bytes(state.detach().cpu().view(-1)[:8].tolist()), "little")


def _mt_position(state: Any) -> int | None:
    """The MT19937 position of Python's ``random`` state or NumPy's saved one."""
    if isinstance(state, Mapping):  # numpy's, as a checkpoint saves it
        pos = state.get("pos")
        return pos if isinstance(pos, int) else None
    if isinstance(state, (list, tuple)) and len(state) == 3:  # Python's (version, internal, g)
        internal = state[1]
        if isinstance(internal, (list, tuple)) and internal and isinstance(internal[-1], int):
            return int(internal[-1])
    return None
