"""Random attacks on protect(): payload x route x protocol x container.

Every payload is a call that writes into a canary folder by a route the
audit hook may not see (a native write, a file handler, a database) or an
ordinary Python one.  A route wraps the call the way an attacker would hide
it: a plain REDUCE, a ``functools.partial``, a nested pickle, copyreg's
reconstructor running a class's ``__init__``.  A container puts the result
where a loader reads it: a pickle file, a torch zip or legacy checkpoint, a
numpy object array, a joblib file.  Building a variant only pickles objects;
nothing here is ever unpickled in the test process.
"""

from __future__ import annotations

import builtins
import copyreg
import functools
import logging
import os
import pathlib
import pickle
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Call:
    """Pickles as ``func(*args)``: what a malicious ``__reduce__`` returns."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _numpy_save(target: Path) -> tuple[Any, tuple[Any, ...]]:
    import numpy as np

    return np.save, (str(target) + ".npy", np.zeros(1))


def _tofile(target: Path) -> tuple[Any, tuple[Any, ...]]:
    import numpy as np

    return np.ndarray.tofile, (np.zeros(1), str(target))


def _torch_save(target: Path) -> tuple[Any, tuple[Any, ...]]:
    import torch

    return torch.save, ({"a": 1}, str(target))


# payload name -> (the call that writes `target`, whether the callable is a class)
PAYLOADS: dict[str, Callable[[Path], tuple[Any, tuple[Any, ...]]]] = {
    "file-handler": lambda t: (logging.FileHandler, (str(t),)),
    "path-touch": lambda t: (pathlib.Path.touch, (pathlib.Path(t),)),
    "open-write": lambda t: (builtins.open, (str(t), "w")),
    "sqlite": lambda t: (sqlite3.connect, (str(t),)),
    "mkdir": lambda t: (os.mkdir, (str(t),)),
    "numpy-save": _numpy_save,
    "numpy-tofile": _tofile,
    "torch-save": _torch_save,
}


def _reconstructor(func: Any, args: tuple[Any, ...], protocol: int) -> Any:
    # copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state).
    return Call(copyreg._reconstructor, (func, func, args[0]))  # type: ignore[attr-defined]


ROUTES: dict[str, Callable[[Any, tuple[Any, ...], int], Any]] = {
    "reduce": lambda f, a, p: Call(f, a),
    "partial": lambda f, a, p: Call(functools.partial(f, *a), ()),
    "nested-pickle": lambda f, a, p: Call(pickle.loads, (pickle.dumps(Call(f, a), protocol=p),)),
    "in-a-list": lambda f, a, p: [1, {"k": Call(f, a)}, "tail"],
    "reconstructor": _reconstructor,
}
# Routes that need the payload to be a class (its __init__ does the writing).
CLASS_ROUTES = frozenset(["reconstructor"])


def _write_pickle(obj: Any, path: Path, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_torch(obj: Any, path: Path, protocol: int, legacy: bool = False) -> None:
    import torch

    torch.save(
        {"weight": torch.ones(3), "extra": obj},
        path,
        pickle_protocol=max(protocol, 2),
        _use_new_zipfile_serialization=not legacy,
    )


def _write_numpy(obj: Any, path: Path, protocol: int) -> None:
    import numpy as np

    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = 1.5, obj
    np.save(path, arr, allow_pickle=True)


def _write_joblib(obj: Any, path: Path, protocol: int) -> None:
    import joblib
    import numpy as np

    joblib.dump({"coef": np.arange(4.0), "extra": obj}, path, protocol=protocol)


# container -> (writer, file suffix, the loading code a victim runs on sys.argv[1])
CONTAINERS: dict[str, tuple[Callable[[Any, Path, int], None], str, str]] = {
    "pickle": (_write_pickle, ".pkl", "import pickle; pickle.load(open(path, 'rb'))"),
    "torch": (_write_torch, ".pt", "import torch; torch.load(path, weights_only=False)"),
    "torch-legacy": (
        lambda o, p, n: _write_torch(o, p, n, legacy=True),
        ".pt",
        "import torch; torch.load(path, weights_only=False)",
    ),
    "numpy": (_write_numpy, ".npy", "import numpy; numpy.load(path, allow_pickle=True)"),
    "joblib": (_write_joblib, ".joblib", "import joblib; joblib.load(path)"),
}


@dataclass(frozen=True)
class Variant:
    payload: str
    route: str
    protocol: int
    container: str

    @property
    def name(self) -> str:
        return f"{self.payload}.{self.route}.p{self.protocol}.{self.container}"

    @property
    def loader(self) -> str:
        return CONTAINERS[self.container][2]

    def build(self, folder: Path, canary_dir: Path) -> Path:
        func, args = PAYLOADS[self.payload](canary_dir / "fired")
        obj = ROUTES[self.route](func, args, self.protocol)
        writer, suffix, _ = CONTAINERS[self.container]
        path = folder / f"{self.name}{suffix}"
        writer(obj, path, self.protocol)
        return path


def random_variants(rng: random.Random, count: int) -> list[Variant]:
    out: list[Variant] = []
    while len(out) < count:
        payload = rng.choice(sorted(PAYLOADS))
        route = rng.choice(sorted(ROUTES))
        if route in CLASS_ROUTES and payload != "file-handler":
            continue
        drawn = Variant(payload, route, rng.randint(0, 5), rng.choice(sorted(CONTAINERS)))
        if any(v.name == drawn.name for v in out):
            continue  # one folder and canary per variant: the same one twice collided
        out.append(drawn)
    return out
