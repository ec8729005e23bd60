"""What every guarded loader shares: the settings, the decision, the sandbox.

``protect()`` writes the settings here; the wrappers in :mod:`guards` and
:mod:`codeguards` read them.  Keeping them apart from ``protect`` lets the
wrappers live in their own modules without an import cycle.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from trainguard.errors import UnsafeModelError
from trainguard.findings import Finding, Severity
from trainguard.loader import sandbox
from trainguard.loader.restricted import PickleModule, policy_line
from trainguard.scanner import Policy

log = logging.getLogger("trainguard")

Unpickler = Literal["trainguard", "real"]


@dataclass
class Config:
    policy: Policy
    mode: str
    strict: bool
    unpickler: Unpickler = "trainguard"
    trust: Any = None  # a loader.trust.TrustPolicy, or None
    originals: dict[tuple[Any, str], Any] = field(default_factory=dict)


config: Config | None = None
_reentry = threading.local()


def policy() -> Policy:
    return config.policy if config is not None else Policy()


def real_unpickler() -> bool:
    """Whether the user opted into running the file's own pickle code."""
    return config is not None and config.unpickler == "real"


def pickle_module(source: str) -> PickleModule:
    """trainguard's restricted unpickler, carrying the policy's allowed globals."""
    return PickleModule(policy().allow_globals, source)


def decide(source: str, findings: list[Finding]) -> None:
    cfg = config
    if cfg is None:
        return
    threshold = Severity.MEDIUM if cfg.strict else Severity.HIGH
    bad = [f for f in findings if f.severity >= threshold]
    for f in findings:
        if f.severity >= Severity.MEDIUM and f not in bad:
            log.warning("trainguard: %s: %s %s: %s", source, f.rule, f.severity, f.message)
    if not bad:
        _preimport(findings)
        return
    if cfg.mode == "block":
        raise UnsafeModelError(source, [_with_policy_line(f) for f in bad])
    for f in bad:
        log.warning(
            "trainguard: loading %s despite %s %s: %s", source, f.rule, f.severity, f.message
        )


# Findings a policy's [allow] globals can answer: a call on a global not known to be safe.
_ALLOWABLE = frozenset(["TG112"])


def _with_policy_line(f: Finding) -> Finding:
    """``f`` with the exact policy lines that would allow its global, when some would."""
    if f.rule not in _ALLOWABLE or not f.trigger or "[allow]" in f.message:
        return f
    line = policy_line(f.trigger).replace("\n", " ")
    return replace(f, message=f"{f.message}; to allow it, add to your policy file: {line}")


def _preimport(findings: list[Finding]) -> None:
    """Import, outside the sandbox, the modules of globals the scan accepted.

    The unpickler would import them anyway; doing it first lets the sandbox
    refuse every import the scan did not see.
    """
    for f in findings:
        if f.rule != "TG103" or not f.trigger:
            continue
        parts = f.trigger.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue


@contextmanager
def guarded(source: str) -> Iterator[None]:
    """Run a loader in the sandbox; turn refusals into UnsafeModelError."""
    _reentry.depth = getattr(_reentry, "depth", 0) + 1
    try:
        with sandbox.sandboxed() as blocked:
            try:
                yield
            except Exception as exc:
                if blocked:
                    raise UnsafeModelError(source, list(blocked)) from exc
                raise
            if blocked:  # the payload swallowed the refusal: still refuse the result
                raise UnsafeModelError(source, list(blocked))
    finally:
        _reentry.depth -= 1


def nested() -> bool:
    """A guarded loader calling another (torch.load -> pickle) already checked its bytes."""
    return getattr(_reentry, "depth", 0) > 0
