"""Findings are data: every check in trainguard reports through these types.

A :class:`Finding` names a stable rule id (documented in ``docs/rules.md``), a
severity, where it was seen (file, archive member, byte offset) and what
triggered it.  The verdict of a scan is the highest severity among its findings;
renderers (text, JSON, SARIF) all read the same :class:`ScanReport`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Severity(enum.IntEnum):
    """Ordered so that ``max()`` over findings gives the verdict."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {text!r} (expected one of: {names})") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: Severity
    help: str


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    message: str
    file: str = ""
    member: str = ""
    offset: int | None = None
    trigger: str = ""
    evidence: dict[str, str] = field(default_factory=dict)

    def located(self, file: str, member_prefix: str = "") -> Finding:
        """The same finding attributed to ``file`` and nested under ``member_prefix``."""
        member = self.member
        if member_prefix:
            member = f"{member_prefix}/{member}" if member else member_prefix
        return replace(self, file=file, member=member)

    @property
    def location(self) -> str:
        where = self.file
        if self.member:
            where += f"!{self.member}"
        if self.offset is not None:
            where += f"@{self.offset}"
        return where


@dataclass
class FileResult:
    """What the scanner learnt about one file on disk."""

    path: str
    format: str
    size: int
    findings: list[Finding] = field(default_factory=list)
    # An error means the scan of this file could not complete. It is reported
    # beside (never instead of) the findings gathered before it happened.
    error: str | None = None

    @property
    def verdict(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)


@dataclass
class ScanReport:
    files: list[FileResult] = field(default_factory=list)
    fail_on: Severity = Severity.HIGH

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.files for f in r.findings]

    @property
    def errors(self) -> list[FileResult]:
        return [r for r in self.files if r.error is not None]

    @property
    def verdict(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    @property
    def failed(self) -> bool:
        verdict = self.verdict
        return verdict is not None and verdict >= self.fail_on

    def exit_code(self) -> int:
        """0 clean, 1 findings at or above ``fail_on``, 2 scan incomplete.

        Findings outrank errors: a file that both errored and carried a
        critical finding exits 1, so an error can never mask a finding.
        """
        if self.failed:
            return 1
        if self.errors:
            return 2
        return 0
