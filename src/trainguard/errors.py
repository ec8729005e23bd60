"""Exception types.  Each pillar raises a subclass of :class:`TrainguardError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainguard.findings import Finding


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


class UnsafeModelError(TrainguardError):
    """A file was refused by the safe loader or by ``protect()``.

    ``findings`` says why: the scanner's findings on the very bytes that were
    about to load, or what the sandbox blocked while they loaded.
    """

    def __init__(self, source: str, findings: list[Finding]) -> None:
        self.source = source
        self.findings = findings
        worst = sorted(findings, key=lambda f: f.severity, reverse=True)[:3]
        reasons = "; ".join(f"{f.rule} {f.severity}: {f.message}" for f in worst)
        more = f" (+{len(findings) - 3} more)" if len(findings) > 3 else ""
        super().__init__(f"refused to load {source}: {reasons}{more}")
