"""Exception types.  Each pillar raises a subclass of :class:`TrainguardError`."""

from __future__ import annotations


class TrainguardError(Exception):
    """Base class: trainguard could not do what it was asked."""


class UsageError(TrainguardError):
    """Bad arguments or configuration (CLI exit code 2)."""


class PolicyError(UsageError):
    """A policy file is unreadable or invalid."""


class ScanError(TrainguardError):
    """Scanning a file could not complete (CLI exit code 2 unless a finding outranks it)."""


class LimitExceeded(ScanError):
    """A bound from :mod:`trainguard.limits` was reached while reading untrusted data."""

    def __init__(self, what: str, limit: int | float) -> None:
        super().__init__(f"{what} exceeds the limit of {limit}")
        self.what = what
        self.limit = limit


class MissingExtraError(TrainguardError):
    """An optional dependency is needed for this operation."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the optional dependency {module!r}; "
            f"install it with: pip install 'trainguard[{extra}]'"
        )
        self.module = module
        self.extra = extra
