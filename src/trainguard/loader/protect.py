"""``trainguard.protect()``: make every model load in this process safe by default.

Patches ``torch.load`` (and ``torch.serialization.load``), ``pickle.load`` /
``pickle.loads``, ``numpy.load``, ``joblib.load`` (and joblib's unpickler),
``torch.jit.load``, ``torch.export.load`` and ``torch.package.PackageImporter``.
Each wrapper (:mod:`guards`, :mod:`codeguards`) reads the bytes once, checks
them against the trust policy if one is set, scans them, refuses
(``mode="block"``) or logs (``mode="warn"``) findings, and then unpickles
those same bytes with trainguard's restricted unpickler inside the sandbox:
the file's pickle code never runs.  Libraries that call these functions
through the module attribute (Hugging Face transformers' Trainer, Accelerate,
Lightning) are covered; code that bound the original function before
``protect()`` ran (``from torch import load``) is not.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

from trainguard.errors import UnsafeModelError, UsageError
from trainguard.loader import codeguards, guards, sandbox, state, vetted
from trainguard.loader.state import Config, Unpickler
from trainguard.loader.trust import TrustPolicy, trust_from
from trainguard.scanner import Policy, registry

log = logging.getLogger("trainguard")

_lock = threading.Lock()
TRUST_ENV = "TRAINGUARD_TRUST"


def protect(
    policy: Policy | None = None,
    mode: str = "block",
    strict: bool = False,
    *,
    unpickler: Unpickler = "trainguard",
    trust: str | os.PathLike[str] | TrustPolicy | None = None,
    env_snapshot: str | os.PathLike[str] | None = None,
    env_key: Any = None,
    env_paths: list[str] | None = None,
) -> None:
    """Check every torch/pickle/numpy/joblib/TorchScript load in this process.

    Every guarded pickle load goes through trainguard's restricted unpickler
    (the semantics of :func:`trainguard.load`, widened to instances of
    ordinary classes): the file's own pickle code never runs.  The policy's
    ``[allow] globals`` lets a project's own classes and functions through;
    a refusal names the line to add.  ``unpickler="real"`` hands the scanned
    bytes to the loaders' own unpicklers instead (the scanner and the sandbox
    are then the only barriers): for compatibility only.

    ``mode="block"`` raises :class:`UnsafeModelError` for findings at or above
    high (medium too with ``strict``); ``mode="warn"`` logs them and loads
    anyway (the restricted unpickler and the sandbox still refuse what the
    payload tries).  ``trust`` (a trust-policy file, or ``TRAINGUARD_TRUST``)
    loads only files a trusted seal covers, byte for byte
    (:mod:`trainguard.loader.trust`).  Calling it again updates the settings.
    With ``env_snapshot`` (and the public ``env_key`` that signed it), the
    Python environment is first checked against that sealed snapshot.
    """
    if mode not in ("block", "warn"):
        raise UsageError(f"mode must be 'block' or 'warn', not {mode!r}")
    if unpickler not in ("trainguard", "real"):
        raise UsageError(f"unpickler must be 'trainguard' or 'real', not {unpickler!r}")
    if trust is None and os.environ.get(TRUST_ENV):
        trust = os.environ[TRUST_ENV]
    trusted = trust_from(trust)
    if unpickler == "real":
        log.warning("trainguard: protect(unpickler='real'): files' own pickle code will run")
    if env_snapshot is not None:
        _check_environment(os.fspath(env_snapshot), env_key, env_paths, mode)
    with _lock:
        if state.config is not None:
            cfg = state.config
            cfg.policy, cfg.mode, cfg.strict = policy or Policy(), mode, strict
            cfg.unpickler, cfg.trust = unpickler, trusted
            return
        cfg = Config(policy or Policy(), mode, strict, unpickler, trusted)
        _patch_all(cfg)
        # Guarded loads scan first; the sandbox around them refuses new imports,
        # so every format the scanner may need is imported now.
        registry.preload()
        vetted.static_table()  # resolving numpy's and torch's names imports their helpers
        sandbox.install()
        state.config = cfg


def _patch_all(cfg: Config) -> None:
    _patch(cfg, pickle, "load", guards.guard_pickle_load)
    _patch(cfg, pickle, "loads", guards.guard_pickle_loads)
    torch = sys.modules.get("torch") or _try_import("torch")
    if torch is not None:
        _warm_up_torch(torch)
        _patch(cfg, torch, "load", guards.guard_torch_load)
        _patch(cfg, torch.serialization, "load", guards.guard_torch_load)
        _patch(cfg, torch.jit, "load", codeguards.guard_jit_load)
        _patch(cfg, torch.export, "load", codeguards.guard_export_load)
        package = _try_import("torch.package")
        if package is not None:
            importer = codeguards.guarded_package_importer
            inner = sys.modules["torch.package.package_importer"]
            _patch(cfg, package, "PackageImporter", importer, wrap=False)
            _patch(cfg, inner, "PackageImporter", importer, wrap=False)
    numpy = sys.modules.get("numpy") or _try_import("numpy")
    if numpy is not None:
        _patch(cfg, numpy, "load", guards.guard_numpy_load)
    joblib = sys.modules.get("joblib") or _try_import("joblib")
    if joblib is not None:
        _patch(cfg, joblib, "load", guards.guard_joblib_load)
        _patch(cfg, joblib.numpy_pickle, "load", guards.guard_joblib_load)
        _patch(cfg, joblib.numpy_pickle, "NumpyUnpickler", guards.joblib_unpickler, wrap=False)


def _check_environment(snapshot: str, key: Any, paths: list[str] | None, mode: str) -> None:
    from trainguard.env.verify import check_against

    bad = check_against(snapshot, key, paths)
    if not bad:
        return
    if mode == "block":
        raise UnsafeModelError("the Python environment", bad)
    for f in bad:
        log.warning("trainguard: environment: %s %s %s", f.file, f.rule, f.message)


def unprotect() -> None:
    """Restore every patched loader."""
    with _lock:
        if state.config is None:
            return
        for (owner, name), original in state.config.originals.items():
            setattr(owner, name, original)
        state.config = None


def is_protected() -> bool:
    return state.config is not None


def _warm_up_torch(torch: Any) -> None:
    """Run torch.load once on a tiny tensor, outside the sandbox.

    Its first call imports and compiles helpers lazily; doing that now keeps
    the sandbox strict for real loads.
    """
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def _try_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _patch(
    cfg: Config, owner: Any, name: str, make: Callable[[Any], Any], *, wrap: bool = True
) -> None:
    original = getattr(owner, name)
    cfg.originals[(owner, name)] = original
    replacement = make(original)
    if wrap:
        functools.update_wrapper(replacement, original)
    replacement.__trainguard_original__ = original
    setattr(owner, name, replacement)
