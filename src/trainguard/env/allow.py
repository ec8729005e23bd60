"""Known-benign differences: a TOML allowlist, and the built-in defaults.

An entry never hides a finding: it lowers its severity (to ``info`` unless it
says otherwise) and records why, so the JSON and SARIF reports still show
what was allowed.  An entry that names a ``sha256`` matches only that exact
content, which is how to accept one rewritten file without accepting any
later change to it.

.. code-block:: toml

    [[allow]]
    path = "*/site-packages/certifi/cacert.pem"   # glob on the absolute path
    rule = "TG601"                               # optional: an id or a list of ids
    sha256 = "9f86d0..."                         # optional: only this content
    severity = "info"                            # optional (default info)
    reason = "our base image adds the corporate CA"
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace

from trainguard.errors import UsageError
from trainguard.findings import Finding, Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MAX_ALLOWLIST_BYTES = 1024 * 1024
_KEYS = frozenset({"path", "rule", "sha256", "severity", "reason"})


@dataclass(frozen=True)
class AllowEntry:
    path: str
    rules: frozenset[str]  # empty: every rule
    sha256: str | None
    severity: Severity
    reason: str
    origin: str

    def matches(self, finding: Finding) -> bool:
        if self.rules and finding.rule not in self.rules:
            return False
        return fnmatch.fnmatchcase(finding.file.replace(os.sep, "/"), self.path)


# Each default lowers a finding that common, legitimate setups produce, to a
# severity that still shows it (low), never to silence.
DEFAULTS: tuple[AllowEntry, ...] = (
    AllowEntry(
        "*/certifi/cacert.pem",
        frozenset({"TG601"}),
        None,
        Severity.LOW,
        "OS packagers and corporate images rewrite certifi's CA bundle; review it, since "
        "a CA added there is trusted for every HTTPS connection",
        "built-in",
    ),
    AllowEntry(
        "*/_virtualenv.pth",
        frozenset({"TG605"}),
        None,
        Severity.LOW,
        "virtualenv (not venv) writes this file to patch distutils in every environment it creates",
        "built-in",
    ),
    AllowEntry(
        "/usr/lib/python3*/sitecustomize.py",
        frozenset({"TG608"}),
        None,
        Severity.LOW,
        "Debian and Ubuntu ship this file (a link into /etc/python3.X) with the "
        "interpreter package",
        "built-in",
    ),
)


def _entry(raw: object, origin: str, index: int) -> AllowEntry:
    where = f"{origin}: allow entry {index}"
    if not isinstance(raw, dict):
        raise UsageError(f"{where} is not a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    path, reason = raw.get("path"), raw.get("reason")
    if not isinstance(path, str) or not path:
        raise UsageError(f"{where}: 'path' (a glob) is required")
    if not isinstance(reason, str) or not reason.strip():
        raise UsageError(f"{where}: 'reason' is required (it is shown in every report)")
    rules = raw.get("rule", [])
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise UsageError(f"{where}: 'rule' must be an id or a list of ids")
    digest = raw.get("sha256")
    if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
        raise UsageError(f"{where}: 'sha256' must be 64 hex digits")
    try:
        severity = Severity.parse(str(raw.get("severity", "info")))
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return AllowEntry(
        path, frozenset(rules), digest.lower() if digest else None, severity, reason.strip(), origin
    )


def load_allowlist(path: str) -> list[AllowEntry]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_ALLOWLIST_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the allowlist: {exc.strerror}") from None
    if len(raw) > MAX_ALLOWLIST_BYTES:
        raise UsageError(f"{path}: larger than {MAX_ALLOWLIST_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not a valid TOML allowlist: {exc}") from None
    unknown = set(doc) - {"allow"}
    if unknown:
        raise UsageError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
    entries = doc.get("allow", [])
    if not isinstance(entries, list):
        raise UsageError(f"{path}: 'allow' must be an array of tables ([[allow]])")
    return [_entry(e, path, i) for i, e in enumerate(entries, start=1)]


def _file_sha256(path: str) -> str | None:
    from trainguard.env.digests import hash_file  # never opens a FIFO or a device

    try:
        return hash_file(path, frozenset({"sha256"})).values["sha256"].hex()
    except OSError:
        return None


def apply_allowlist(findings: Iterable[Finding], entries: Iterable[AllowEntry]) -> list[Finding]:
    """``findings`` with every allowed one lowered and annotated."""
    rules = list(entries)
    out: list[Finding] = []
    digests: dict[str, str | None] = {}
    for finding in findings:
        for entry in rules:
            if not entry.matches(finding):
                continue
            if entry.sha256 is not None:
                digest = finding.evidence.get("sha256")
                if digest is None:
                    if finding.file not in digests:
                        digests[finding.file] = _file_sha256(finding.file)
                    digest = digests[finding.file]
                if digest != entry.sha256:
                    continue
            evidence = dict(finding.evidence, allowed=f"{entry.reason} ({entry.origin})")
            if entry.severity < finding.severity:
                finding = replace(finding, severity=entry.severity, evidence=evidence)
            else:
                finding = replace(finding, evidence=evidence)
            break
        out.append(finding)
    return out
