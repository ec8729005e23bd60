"""Random state: digests per step, and detection of re-seeding.

Legitimate training consumes randomness, so the states move every step; what
they never do is jump back to a state already seen (a re-seed to the same
seed) or change torch's recorded initial seed (any ``manual_seed`` call).
Seeding functions are also wrapped while a guard runs, so a call to them is
seen even when the seed is new.

A seeding call whose effect is undone changed nothing: ``torch.manual_seed(0)`` inside
``torch.random.fork_rng()`` for a repeatable evaluation (honest-user hunt), or any loop
that saves the states and puts them back (Lightning's ``isolate_rng``).  The wrapper
keeps the states the call replaces (the generators it seeds, read just before it) and
the functions that set a state (``torch.set_rng_state``, ``random.setstate``, ...) are
wrapped too: after each, a pending call whose generators all hold exactly the states
they held before it is dropped.  What is verified is the state, not the context
manager: a seed inside ``fork_rng`` whose state leaks out (a generator it does not
restore, a draw after it on another generator) stays a re-seed.  A CUDA seed on a
machine with CUDA not yet initialised is applied later, lazily: never undone.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _digest(obj: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    if hasattr(obj, "numpy"):
        h.update(obj.numpy().tobytes())
    elif isinstance(obj, tuple):
        for part in obj:
            h.update(repr(part).encode() if not hasattr(part, "tobytes") else part.tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def state_digests() -> dict[str, str]:
    import torch

    out = {"torch": _digest(torch.get_rng_state()), "python": _digest(random.getstate())}
    try:
        import numpy as np

        out["numpy"] = _digest(np.random.get_state())
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = _digest(torch.cuda.get_rng_state())
    return out


def initial_seed() -> int:
    import torch

    return int(torch.initial_seed())


@dataclass
class Seeding:
    """One seeding call: as the alert names it, and the states it replaced (by generator
    name; None when it cannot be undone)."""

    call: str
    before: dict[str, Any] | None


# The generators each seeding function seeds (torch.manual_seed seeds every CUDA device).
SEEDS = {
    "torch.manual_seed": ("torch", "cuda"),
    "torch.random.manual_seed": ("torch", "cuda"),
    "torch.cuda.manual_seed": ("cuda",),
    "torch.cuda.manual_seed_all": ("cuda",),
    "numpy.random.seed": ("numpy",),
    "random.seed": ("python",),
}


class SeedWatch:
    """Wraps the seeding functions while a run is watched; records each call.

    One wrapper per function for the whole process, carrying the list of watches that
    listen to it: a second guard joins the wrapper it finds instead of leaving it be (a
    guard never closed, or one whose checks were tampered with so its close never ran,
    once left the wrapper feeding only its own dead list: every later guard in the
    process was blind to seeding calls).  The last watch to leave puts the original back.
    The functions that set a state are wrapped the same way and tell ``on_restore``.
    """

    TARGETS = (
        ("torch", "manual_seed"),
        ("torch.random", "manual_seed"),
        ("torch.cuda", "manual_seed"),
        ("torch.cuda", "manual_seed_all"),
        ("numpy.random", "seed"),
        ("random", "seed"),
    )
    RESTORES = (
        ("torch", "set_rng_state"),
        ("torch.random", "set_rng_state"),
        ("torch.cuda", "set_rng_state"),
        ("torch.cuda", "set_rng_state_all"),
        ("numpy.random", "set_state"),
        ("random", "setstate"),
    )

    def __init__(
        self, on_call: Callable[[Seeding], None], on_restore: Callable[[], None] | None = None
    ) -> None:
        self.on_call = on_call
        self.on_restore = on_restore
        self._joined: list[tuple[Any, str, Any, Any]] = []  # (module, name, wrapper, listener)

    def install(self) -> None:
        import importlib

        wanted: list[tuple[tuple[str, str], bool, Callable[..., None]]]
        wanted = [(t, False, self.on_call) for t in self.TARGETS]
        if self.on_restore is not None:
            wanted += [(t, True, self.on_restore) for t in self.RESTORES]
        for (module_name, attr), restore, listener in wanted:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            current = getattr(module, attr, None)
            if current is None:
                continue
            if not isinstance(getattr(current, "__trainguard_seedwatch__", None), list):
                current = _wrap(f"{module_name}.{attr}", current, restore)
                setattr(module, attr, current)
            current.__trainguard_seedwatch__.append(listener)
            self._joined.append((module, attr, current, listener))

    def uninstall(self) -> None:
        for module, attr, wrapper, listener in reversed(self._joined):
            listeners = wrapper.__trainguard_seedwatch__
            if listener in listeners:
                listeners.remove(listener)
            original = wrapper.__wrapped__
            if not listeners and getattr(module, attr, None) is wrapper:
                setattr(module, attr, original)
        self._joined.clear()


def _wrap(name: str, original: Any, restore: bool) -> Any:
    listeners: list[Callable[..., None]] = []

    def seeded(*args: Any, **kwargs: Any) -> Any:
        if restore:  # a state set: pending seeding calls may be undone now
            out = original(*args, **kwargs)
            for listener in list(listeners):
                listener()
            return out
        if listeners:
            seeding = Seeding(f"{name}({', '.join(map(repr, args))})", _states(SEEDS[name]))
            for listener in list(listeners):
                listener(seeding)
        return original(*args, **kwargs)

    seeded.__trainguard_seedwatch__ = listeners  # type: ignore[attr-defined]
    seeded.__wrapped__ = original  # type: ignore[attr-defined]
    return seeded


def _states(kinds: tuple[str, ...]) -> dict[str, Any] | None:
    """Copies of the named generators' states now; None when one cannot be read back
    (CUDA present but not initialised: its seed is queued, applied at initialisation)."""
    import torch

    out: dict[str, Any] = {}
    for kind in kinds:
        if kind == "torch":
            out[kind] = torch.get_rng_state()
        elif kind == "cuda":
            if not torch.cuda.is_available():
                continue  # no device: a CUDA seed is never applied
            if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
                return None
            out[kind] = torch.cuda.get_rng_state_all()
        elif kind == "python":
            out[kind] = random.getstate()
        else:
            import numpy as np

            out[kind] = np.random.get_state()
    return out


def undone(seeding: Seeding) -> bool:
    """Whether every generator ``seeding`` seeded holds exactly the state it held before."""
    if seeding.before is None:
        return False
    now = _states(tuple(seeding.before))
    return now is not None and all(_same(now.get(k), v) for k, v in seeding.before.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, list):  # one state per CUDA device
        return isinstance(a, list) and len(a) == len(b) and all(map(_same, a, b))
    return a is not None and _digest(a) == _digest(b)


def generator_digest(generator: Any) -> str:
    """A digest of one private ``torch.Generator``'s state."""
    return _digest(generator.get_state())
