"""SARIF 2.1.0, in the subset that GitHub code scanning reads.

How a finding maps onto SARIF is documented in ``docs/output.md``.  Two GitHub
habits shape it: code scanning places an alert only on a line, so every region
says ``startLine: 1`` (a model file has no lines; the byte offset rides beside
it), and it takes an alert's severity from its rule's ``security-severity``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import PurePath
from urllib.parse import quote

from trainguard.findings import Finding, ScanReport, Severity
from trainguard.render.options import Options
from trainguard.rules import RULES

SARIF_VERSION = "2.1.0"
# The OASIS errata01 schema, the one vendored in tests/data for validation.
SARIF_SCHEMA_URI = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
TOOL_NAME = "trainguard"
# Placeholder until the project has a published home page.
INFORMATION_URI = "https://github.com/trainguard/trainguard"
# Versioned so that a change to the hashed fields starts a new series of alerts
# instead of silently re-matching old ones.
FINGERPRINT_KEY = "trainguardFinding/v1"

# GitHub reads security-severity as a CVSS-like score: >= 9.0 critical,
# >= 7.0 high, >= 4.0 medium, > 0 low.
SECURITY_SEVERITY: dict[Severity, str] = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}
LEVEL: dict[Severity, str] = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}

_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def artifact_uri(path: str, root: str) -> str:
    """``path`` as a URI reference relative to directory ``root``: forward slashes, escaped.

    GitHub matches alerts to files by a path relative to the repository root.  A
    path outside ``root`` cannot be expressed that way and becomes an absolute
    ``file:`` URI, which stays truthful even if GitHub cannot place it.
    """
    # A relative path is relative to the working directory, as the user typed it.
    # Normalised lexically, never resolved: following links would read the disk
    # and could name a file other than the one scanned.
    base = os.path.abspath(root)
    full = PurePath(os.path.abspath(path))
    try:
        relative = full.relative_to(base)
    except ValueError:
        return full.as_uri()
    # surrogateescape gives back the raw bytes of a name that is not UTF-8.
    return quote(relative.as_posix(), safe="/", errors="surrogateescape")


def fingerprint(finding: Finding, uri: str) -> str:
    offset = "" if finding.offset is None else str(finding.offset)
    fields = (finding.rule, uri, finding.member, offset, finding.trigger)
    data = "\0".join(fields).encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()


def _short_description(help_text: str, fallback: str) -> str:
    first = _SENTENCE_END.split(help_text, maxsplit=1)[0].strip()
    return first or fallback


def _rule_descriptor(rule_id: str, severity: Severity) -> dict[str, object]:
    known = RULES.get(rule_id)
    name = known.title if known else rule_id
    help_text = known.help if known else f"Rule {rule_id} is not in trainguard's registry."
    default = Severity(known.severity) if known else severity
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": _short_description(help_text, name)},
        "fullDescription": {"text": help_text},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": LEVEL[default]},
        "properties": {
            "security-severity": SECURITY_SEVERITY[severity],
            "tags": ["security"],
        },
    }


def _rules(report: ScanReport) -> list[dict[str, object]]:
    """Every registered rule, in registry order, then any unregistered id seen.

    Listing all rules keeps each ``ruleIndex`` the same from one scan to the
    next.  GitHub shows one severity per rule, so a rule whose findings a policy
    re-rated is scored at the highest severity it was reported at in this run.
    """
    seen: dict[str, Severity] = {}
    for f in report.findings:
        sev = Severity(f.severity)
        seen[f.rule] = max(seen.get(f.rule, sev), sev)
    for rule_id, known in RULES.items():
        seen.setdefault(rule_id, Severity(known.severity))
    ids = list(RULES) + [r for r in seen if r not in RULES]
    return [_rule_descriptor(r, seen[r]) for r in ids]


def _message(finding: Finding) -> str:
    text = finding.message
    if finding.trigger and finding.trigger not in text:
        text += f" (trigger: {finding.trigger})"
    # GitHub shows the file but not logical locations, so name the member here.
    if finding.member:
        where = finding.member if finding.offset is None else f"{finding.member}@{finding.offset}"
        text += f" [in {where}]"
    return text


def _result(finding: Finding, path: str, rule_index: int, root: str) -> dict[str, object]:
    uri = artifact_uri(finding.file or path, root)
    region: dict[str, object] = {"startLine": 1}
    location: dict[str, object] = {
        "physicalLocation": {"artifactLocation": {"uri": uri}, "region": region}
    }
    if finding.member:
        # The offset counts from the start of the member's (decompressed) data,
        # not from the start of the file, so it cannot be a region's byteOffset.
        location["logicalLocations"] = [{"fullyQualifiedName": finding.member}]
    elif finding.offset is not None:
        region["byteOffset"] = finding.offset
    properties: dict[str, object] = {"severity": str(Severity(finding.severity))}
    if finding.member:
        properties["member"] = finding.member
    if finding.offset is not None:
        properties["offset"] = finding.offset
    if finding.trigger:
        properties["trigger"] = finding.trigger
    if finding.evidence:
        properties["evidence"] = dict(sorted(finding.evidence.items()))
    return {
        "ruleId": finding.rule,
        "ruleIndex": rule_index,
        "level": LEVEL[Severity(finding.severity)],
        "message": {"text": _message(finding)},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(finding, uri)},
        "properties": properties,
    }


def sarif_dict(
    report: ScanReport, *, tool_version: str, root: str | None = None
) -> dict[str, object]:
    """The SARIF log; paths are made relative to ``root`` (the working directory)."""
    base = os.getcwd() if root is None else root
    rules = _rules(report)
    index = {str(r["id"]): i for i, r in enumerate(rules)}
    results = [_result(f, r.path, index[f.rule], base) for r in report.files for f in r.findings]
    notifications = [
        {
            "level": "error",
            "message": {"text": f"scan incomplete: {r.error}"},
            "locations": [
                {"physicalLocation": {"artifactLocation": {"uri": artifact_uri(r.path, base)}}}
            ],
        }
        for r in report.errors
    ]
    invocation = {
        "executionSuccessful": not notifications,
        "exitCode": report.exit_code(),
        "toolExecutionNotifications": notifications,
    }
    driver = {
        "name": TOOL_NAME,
        "version": tool_version,
        "informationUri": INFORMATION_URI,
        "rules": rules,
    }
    return {
        "$schema": SARIF_SCHEMA_URI,
        "version": SARIF_VERSION,
        "runs": [{"tool": {"driver": driver}, "invocations": [invocation], "results": results}],
    }


def render_sarif(report: ScanReport, *, tool_version: str, root: str | None = None) -> str:
    # ensure_ascii for the same reasons as the JSON report.
    document = sarif_dict(report, tool_version=tool_version, root=root)
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def draw(report: ScanReport, options: Options) -> str:
    return render_sarif(report, tool_version=options.tool_version, root=options.root)
