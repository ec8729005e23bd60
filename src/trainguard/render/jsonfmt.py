"""The machine report: one JSON document, documented in ``docs/output.md``.

Keys come out in a fixed order and every severity is always present in the
summary, so that two scans of the same files diff cleanly.  Bump
:data:`SCHEMA_VERSION` whenever a key changes meaning or disappears; adding a
key is not a break.

(The module is not called ``json`` so that it never shadows the standard
library for a tool that puts this folder on ``sys.path``.)
"""

from __future__ import annotations

import json

from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.render.options import Options
from trainguard.rules import RULES

SCHEMA_VERSION = 1
TOOL_NAME = "trainguard"


def _severity(sev: Severity | None) -> str | None:
    return None if sev is None else str(Severity(sev))


def finding_dict(finding: Finding, path: str) -> dict[str, object]:
    known = RULES.get(finding.rule)
    return {
        "rule": finding.rule,
        "name": known.title if known else "",
        "severity": _severity(finding.severity),
        "message": finding.message,
        "file": finding.file or path,
        "member": finding.member,
        "offset": finding.offset,
        "trigger": finding.trigger,
        "evidence": dict(sorted(finding.evidence.items())),
    }


def file_dict(result: FileResult) -> dict[str, object]:
    return {
        "path": result.path,
        "format": result.format,
        "size": result.size,
        "verdict": _severity(result.verdict),
        "error": result.error,
        "findings": [finding_dict(f, result.path) for f in result.findings],
    }


def report_dict(report: ScanReport, *, tool_version: str) -> dict[str, object]:
    findings = report.findings
    by_severity = {
        str(sev): sum(1 for f in findings if f.severity == sev)
        for sev in sorted(Severity, reverse=True)
    }
    return {
        "tool": TOOL_NAME,
        "version": tool_version,
        "schema": SCHEMA_VERSION,
        "fail_on": str(report.fail_on),
        "verdict": _severity(report.verdict),
        "exit_code": report.exit_code(),
        "files": [file_dict(r) for r in report.files],
        "summary": {
            "files": len(report.files),
            "errors": len(report.errors),
            "findings": len(findings),
            "by_severity": by_severity,
        },
    }


def render_json(report: ScanReport, *, tool_version: str) -> str:
    # ensure_ascii: the document is plain ASCII whatever the file names hold, so it
    # survives any stdout encoding, and a name that is not valid UTF-8 (a lone
    # surrogate from os.fsdecode) still round-trips exactly through json.loads.
    document = report_dict(report, tool_version=tool_version)
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def draw(report: ScanReport, options: Options) -> str:
    return render_json(report, tool_version=options.tool_version)
