"""protect()'s restricted unpickler: attacks that act at load or later, honest objects unchanged.

Attacks that the scanner may rate below high still must not take effect:
each is proven to act under the real loader (a trigger after the load shows
it: a negated gradient, a zeroed weight, a file in the canary folder) in a
forked child of a subprocess, then loaded under protect() in another.
Honest checkpoints come back equal to what the real loader gives.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap
import types
import typing
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from tests.protect_variants import Call

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parents[1]

# The victim: load (under protect() unless mode is "real"), then train a step
# and look at what the load did; write the canary if the attack took effect.
_RUNNER = textwrap.dedent(
    """
    import json, os, sys
    import torch, numpy, trainguard
    mode = sys.argv[1]
    for path, trigger, canary in json.loads(sys.argv[2]):
        pid = os.fork()
        if pid == 0:
            os.environ["TMPDIR"] = canary
            import tempfile; tempfile.tempdir = None
            if mode != "real":
                trainguard.protect(mode=mode)
            status = "loaded"
            try:
                ckpt = torch.load(path, weights_only=False)
                if eval(trigger, {"ckpt": ckpt, "torch": torch}):
                    open(os.path.join(canary, "fired"), "w").close()
            except trainguard.UnsafeModelError as exc:
                status = "refused " + exc.findings[0].message[:200]
            except BaseException as exc:
                status = "error " + repr(exc)[:200]
            fired = bool(os.listdir(canary))
            os.write(1, (json.dumps([path, status, fired]) + "\\n").encode())
            os._exit(0)
        os.waitpid(pid, 0)
    """
)


def _param_grad_negated() -> str:
    return "((ckpt['p'] * 1).sum().backward() or True) and bool((ckpt['p'].grad < 0).all())"


def _attacks() -> dict[str, tuple[Any, str]]:
    """name -> (the object torch.save writes, the trigger that shows the attack acted)."""
    ones = torch.ones(3)
    hooks = OrderedDict({0: torch.neg})
    rebuild = torch._utils
    return {
        # The incident's flipped gradients, by every route a parameter takes hooks.
        "parameter-hooks": (
            {"p": Call(rebuild._rebuild_parameter, (ones.clone(), True, hooks))},
            _param_grad_negated(),
        ),
        "parameter-state-hooks": (
            {
                "p": Call(
                    rebuild._rebuild_parameter_with_state,
                    (ones.clone(), True, OrderedDict(), {"_backward_hooks": hooks}),
                )
            },
            _param_grad_negated(),
        ),
        "tensor-setstate-hooks": (
            {"p": _WithState(ones.clone().requires_grad_(), (True, None, hooks))},
            _param_grad_negated(),
        ),
        # A parameter made by calling its class, then given hooks by BUILD: a module
        # from the file (ReLU) clips its gradients.
        "parameter-class-build-hooks": (
            {"p": _Build(torch.nn.Parameter, (ones.clone(),), (True, None, _relu_hook()))},
            "((ckpt['p'] * -1).sum().backward() or True) and bool((ckpt['p'].grad == 0).all())",
        ),
        # A weight silently changed at load by an in-place initialiser.
        "inplace-init": (
            _zeroed(ones.clone()),
            "bool((ckpt['w'] == 0).all())",
        ),
        # A finalizer: no call at all, the class's __del__ acts on the file's state.
        "finalizer": (
            {"f": _finalizer()},
            "ckpt.clear() or bool(__import__('gc').collect()) and False",
        ),
        # A factory called later, on the first missing key: a folder appears.
        "defaultdict-factory": (
            {"d": collections.defaultdict(tempfile.TemporaryDirectory)},
            "ckpt.__setitem__('keep', ckpt['d']['missing']) or False",
        ),
    }


class _Build:
    """Pickles as ``func(*args)`` followed by BUILD with ``state``."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args, self.state


def _relu_hook() -> OrderedDict[int, Any]:
    return OrderedDict({0: torch.nn.ReLU()})


class _WithState:
    """Pickles as a tensor rebuilt by torch, followed by BUILD with ``state``."""

    def __init__(self, tensor: Any, state: Any) -> None:
        self.tensor, self.state = tensor, state

    def __reduce__(self) -> tuple[Any, ...]:
        func, args = self.tensor.__reduce_ex__(2)
        return func, args, self.state


class Finalizer:
    """An ordinary class whose finalizer writes where its state says."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __del__(self) -> None:
        if hasattr(self, "name"):
            open(os.path.join(tempfile.gettempdir(), self.name), "w").close()


class _FinalizerPickle:
    """Pickles as a Finalizer with its state (created, then BUILD); none exists here."""

    def __reduce__(self) -> tuple[Any, ...]:
        return copyreg._reconstructor, (Finalizer, object, None), {"name": "fired"}  # type: ignore[attr-defined]


def _finalizer() -> _FinalizerPickle:
    return _FinalizerPickle()


def _zeroed(w: Any) -> dict[str, Any]:
    return {"w": w, "_": Call(torch.nn.init.zeros_, (w,))}


def _run(mode: str, jobs: list[tuple[str, str, str]]) -> dict[str, tuple[str, bool]]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, mode, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            path, status, fired = json.loads(line)
            out[Path(path).stem] = (status, fired)
    assert len(out) == len(jobs), proc.stderr[-2000:]
    return out


def _build(tmp_path: Path, mode: str) -> list[tuple[str, str, str]]:
    jobs = []
    for name, (obj, trigger) in _attacks().items():
        canary = tmp_path / mode / name
        canary.mkdir(parents=True)
        path = tmp_path / mode / f"{name}.pt"
        torch.save(obj, path)
        jobs.append((str(path), trigger, str(canary)))
    return jobs


def test_attacks_act_under_torch_load_and_never_under_protect(tmp_path: Path) -> None:
    real = _run("real", _build(tmp_path, "real"))
    assert {n: r for n, r in real.items() if not r[1]} == {}, "an attack does not act"
    for mode in ("block", "warn"):
        guarded = _run(mode, _build(tmp_path, mode))
        assert {n: r for n, r in guarded.items() if r[1]} == {}, mode
        assert all(r[0].startswith("refused") for r in guarded.values()), guarded


# -- honest objects -------------------------------------------------------------


Point = collections.namedtuple("Point", "x y")


class Config:
    """A project's own class, built by a call (needs the policy) or by NEWOBJ (does not)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __eq__(self, other: object) -> bool:
        return type(other) is Config and other.lr == self.lr


class CalledConfig(Config):
    def __reduce__(self) -> tuple[Any, ...]:
        return CalledConfig, (self.lr,)


def honest_objects() -> dict[str, Any]:
    from pytorch_lightning.utilities.parsing import AttributeDict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    return {
        "model-object": model,
        "optimizer": opt.state_dict(),
        "scheduler-object": sched,
        "lightning-like": {
            "state_dict": model.state_dict(),
            "hyper_parameters": AttributeDict(lr=0.1, layers=[4, 3], any=typing.Any),
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
        },
        "plain-python": {
            "when": datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc),
            "pattern": re.compile("a+b", re.IGNORECASE),
            "flags": re.IGNORECASE | re.MULTILINE,
            "point": Point(1, 2),
            "ns": types.SimpleNamespace(a=1),
            "counter": collections.Counter("aab"),
            "config": Config(0.5),
        },
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.RandomState(3).get_state()},
        "numpy-objects": np.array([1, "a", None, (2, 3)], dtype=object),
    }


_COMPARE = textwrap.dedent(
    """
    import sys, pickle, torch, trainguard
    from tests.test_protect_unpickler import equal
    names = sys.argv[1:]
    real = {n: torch.load(f"{n}.pt", weights_only=False) for n in names}
    trainguard.protect()
    for n in names:
        try:
            ok = equal(real[n], torch.load(f"{n}.pt", weights_only=False))
        except trainguard.UnsafeModelError as exc:
            ok = "refused: " + exc.findings[0].message
        print(n, ok)
    """
)


def equal(a: Any, b: Any, depth: int = 0) -> bool:
    """Same types and values, down through containers and objects' attributes."""
    if type(a) is not type(b) or depth > 30:
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and all(map(equal, a.flat, b.flat))
    if isinstance(a, dict):
        pairs = zip(a.items(), b.items(), strict=True)
        return len(a) == len(b) and all(
            equal(ka, kb, depth + 1) and equal(va, vb, depth + 1) for (ka, va), (kb, vb) in pairs
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and not isinstance(a, type) and type(a).__eq__ is object.__eq__:
        return equal(vars(a), vars(b), depth + 1)
    return bool(a == b) or a is b


def test_honest_objects_load_equal_under_protect(tmp_path: Path) -> None:
    for name, obj in honest_objects().items():
        torch.save(obj, tmp_path / f"{name}.pt")
    names = list(honest_objects())
    proc = subprocess.run(
        [sys.executable, "-c", _COMPARE, *names],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), **_env()},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert results == {n: "True" for n in names}


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


_POLICY = textwrap.dedent(
    """
    import sys, torch, trainguard
    trainguard.protect()
    try:
        torch.load(sys.argv[1], weights_only=False)
        print("loaded")
    except trainguard.UnsafeModelError as exc:
        print(exc.findings[0].message)
    trainguard.protect(policy=trainguard.Policy.load(sys.argv[2]))
    print(torch.load(sys.argv[1], weights_only=False)["cfg"].lr)
    try:
        torch.load(sys.argv[1], weights_only=True)
    except Exception as exc:
        print("weights_only:", type(exc).__name__)
    """
)


def test_refusal_names_the_policy_line_that_allows_it(tmp_path: Path) -> None:
    torch.save({"cfg": CalledConfig(0.25), "w": torch.ones(2)}, tmp_path / "c.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _POLICY, str(tmp_path / "c.pt"), str(tmp_path / "policy.toml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    first = proc.stdout.splitlines()[0] if proc.stdout else proc.stderr[-2000:]
    line = 'globals = ["tests.test_protect_unpickler.CalledConfig"]'
    assert line in first and "[allow]" in first
    (tmp_path / "policy.toml").write_text(f"[allow]\n{line}\n")
    proc = subprocess.run(
        [sys.executable, "-c", _POLICY, str(tmp_path / "c.pt"), str(tmp_path / "policy.toml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Allowed by the policy it loads; torch's weights_only=True still refuses it.
    assert proc.stdout.splitlines()[1:] == ["0.25", "weights_only: UnpicklingError"]


def _dotted_call(module: str, qualname: str, args: tuple[Any, ...]) -> bytes:
    """``module.qualname(*args)`` named by one STACK_GLOBAL (protocol 4), no getattr."""
    body = pickle.dumps(args, protocol=4)[2:-1]  # the args tuple without PROTO and STOP
    if body[:1] == b"\x95":  # FRAME
        body = body[9:]
    name = (
        b"\x8c" + bytes([len(module)]) + module.encode()
        + b"\x8c" + bytes([len(qualname)]) + qualname.encode()
    )  # fmt: skip
    return b"\x80\x04" + name + b"\x93" + body + b"R."


_WARN = textwrap.dedent(
    """
    import os, pickle, sys, trainguard
    path, canary, mode = sys.argv[1:]
    if mode != "real":
        trainguard.protect(mode=mode)
    try:
        pickle.load(open(path, "rb"))
        print("loaded", os.path.exists(canary))
    except trainguard.UnsafeModelError as exc:
        print("refused", os.path.exists(canary), sorted({f.rule for f in exc.findings}))
    """
)


def test_a_write_the_scanner_and_sandbox_rate_medium_is_stopped_by_the_unpickler(
    tmp_path: Path,
) -> None:
    # numpy.ndarray.dump writes a file natively; named as one dotted global the
    # scanner rates it medium and the sandbox's import check lets it through.
    canary = tmp_path / "canary"
    path = tmp_path / "dump.pkl"
    path.write_bytes(_dotted_call("numpy", "ndarray.dump", (np.zeros(1), str(canary))))
    out = {}
    for mode in ("real", "warn", "block"):
        proc = subprocess.run(
            [sys.executable, "-c", _WARN, str(path), str(canary), mode],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = proc.stdout.strip()
        if mode == "real":
            assert canary.exists(), out
            canary.unlink()
    assert out["real"] == "loaded True"
    assert out["warn"] == "refused False ['TG401']"
    assert out["block"].startswith("refused False")
