"""Findings about code that runs without being asked: ``.pth`` lines, customize
modules, compiled files and files no RECORD lists.

Each function turns one piece of evidence into findings; the wording says what
the interpreter would do with the file, since that is what makes it matter.
"""

from __future__ import annotations

import os
from importlib.machinery import BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES

from trainguard.env.imports import Importer
from trainguard.env.pth import PthFile
from trainguard.env.pyc import (
    MATCH,
    MISMATCH,
    NO_SOURCE,
    TOO_LARGE,
    UNREADABLE,
    UNUSED,
    PycVerdict,
)
from trainguard.env.record import InstalledDist
from trainguard.findings import Finding, Severity
from trainguard.rules import rule

CODE_SUFFIXES = (
    ".pth",
    ".pyo",
    *SOURCE_SUFFIXES,
    *BYTECODE_SUFFIXES,
    *EXTENSION_SUFFIXES,
    ".so",
    ".pyd",
    ".dylib",
    ".dll",
)
MAX_EVIDENCE_LINE = 200


def finding(
    rule_id: str,
    message: str,
    file: str,
    *,
    severity: Severity | None = None,
    trigger: str = "",
    evidence: dict[str, str] | None = None,
    **more: str,
) -> Finding:
    return Finding(
        rule_id,
        rule(rule_id).severity if severity is None else severity,
        message,
        file=file,
        trigger=trigger,
        evidence={**(evidence or {}), **more},
    )


def is_code(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(CODE_SUFFIXES) or ".so." in name


def unlisted_finding(
    path: str, kind: str, size: int, shadows: str | None, imported: tuple[str, Importer] | None
) -> Finding:
    """``imported``: a module name this file makes importable, and installed code that
    refers to that name (see :mod:`trainguard.env.imports`)."""
    if shadows is not None:
        return finding(
            "TG604",
            f"no RECORD lists it, and Python imports it instead of the installed {shadows}",
            path,
            shadows=shadows,
        )
    if imported is not None:
        name, by = imported
        where = f"{by.file}:{by.line}" if by.line else by.file
        return finding(
            "TG604",
            f"no RECORD lists it, and it is what `import {name}` runs, which installed "
            f"code asks for when present ({where}: {by.how})",
            path,
            trigger=by.how[:MAX_EVIDENCE_LINE],
            module=name,
            imported_by=where,
        )
    if kind != "file":
        return finding(
            "TG603",
            f"no RECORD lists it (a {kind}, not a regular file)",
            path,
            severity=Severity.MEDIUM,
        )
    severity = Severity.MEDIUM if is_code(path) else Severity.LOW
    what = "code" if severity == Severity.MEDIUM else "a file"
    return finding(
        "TG603",
        f"no RECORD lists it ({what}, {size:,} bytes)",
        path,
        severity=severity,
        size=str(size),
    )


def outside_path_lines(pth: PthFile, roots: list[str]) -> list[tuple[str, str]]:
    """(line, folder) for each path line that puts a folder outside ``roots`` (the site
    folders) on ``sys.path``, resolved as ``site`` does (relative to the ``.pth``'s
    folder) and through links, so that ``inside/link-to-elsewhere`` is outside too."""
    real_roots = [os.path.realpath(r) for r in roots]
    site_folder = os.path.dirname(pth.path)
    out: list[tuple[str, str]] = []
    for line in pth.path_lines:
        target = os.path.realpath(os.path.join(site_folder, line.rstrip()))
        if not any(target == r or target.startswith(r + os.sep) for r in real_roots):
            out.append((line, target))
    return out


def pth_findings(
    pth: PthFile, owner: InstalledDist | None, verified: bool, roots: list[str]
) -> list[Finding]:
    """``verified``: a RECORD lists the file and its hash matches."""
    shown = [line[:MAX_EVIDENCE_LINE] for line in pth.exec_lines[:5]]
    evidence = {f"line_{i}": line for i, line in enumerate(shown, start=1)}
    out: list[Finding] = []
    if pth.exec_lines:
        trigger = shown[0]
        if owner is not None and verified:
            out.append(
                finding(
                    "TG606",
                    f"runs code at every interpreter start; installed unchanged by {owner.label}",
                    pth.path,
                    trigger=trigger,
                    evidence=evidence,
                )
            )
        else:
            why = (
                "no RECORD lists it"
                if owner is None
                else f"its content is not what {owner.label}'s RECORD says"
            )
            out.append(
                finding(
                    "TG605",
                    f"runs code at every interpreter start, and {why}",
                    pth.path,
                    trigger=trigger,
                    evidence=evidence,
                )
            )
    outside = outside_path_lines(pth, roots)
    why = "and no RECORD vouches for it"
    if verified and owner is not None:
        # Only an editable install has a reason to point outside: at its own source
        # folder, which its direct_url.json names.  A row added to some RECORD for a
        # planted .pth does not make that distribution editable.
        source = os.path.realpath(owner.editable) if owner.editable else None
        outside = [
            (line, target)
            for line, target in outside
            if source is None or not (target == source or target.startswith(source + os.sep))
        ]
        why = f"and {owner.label}, whose RECORD lists it, is not an editable install of it"
    if outside:
        # Whatever that folder holds becomes importable, and nothing verifies it:
        # a module there under an optional dependency's name runs unseen.
        line, target = outside[0]
        out.append(
            finding(
                "TG607",
                f"adds {len(outside)} folder(s) outside the site folders to sys.path at "
                f"every start ({target[:MAX_EVIDENCE_LINE]}), {why}",
                pth.path,
                severity=Severity.HIGH,
                trigger=line[:MAX_EVIDENCE_LINE],
                folder=target[:MAX_EVIDENCE_LINE],
            )
        )
    elif not pth.exec_lines and pth.path_lines and not verified:
        out.append(
            finding(
                "TG607",
                f"adds {len(pth.path_lines)} folder(s) to sys.path at every "
                "start, and no RECORD vouches for it",
                pth.path,
                trigger=pth.path_lines[0][:MAX_EVIDENCE_LINE],
            )
        )
    if pth.error is not None:
        out.append(finding("TG002", f"{pth.error}", pth.path))
    return out


def startup_finding(
    module: str, path: str, position: int, owner: InstalledDist | None, verified: bool
) -> Finding:
    where = f"position {position} on the startup path"
    if owner is not None and verified:
        return finding(
            "TG609",
            f"{module} runs at every interpreter start ({where}); installed "
            f"unchanged by {owner.label}",
            path,
            trigger=module,
        )
    why = (
        "no RECORD lists it"
        if owner is None
        else f"its content is not what {owner.label}'s RECORD says"
    )
    return finding(
        "TG608",
        f"{module} runs at every interpreter start ({where}), and {why}",
        path,
        trigger=module,
    )


def pyc_finding(verdict: PycVerdict) -> Finding | None:
    status, path = verdict.status, verdict.pyc
    source = os.path.basename(verdict.source) or "its source"
    evidence = {"source": verdict.source} if verdict.source else {}
    if status == MATCH:
        return None
    if status == MISMATCH:
        return finding(
            "TG610",
            f"Python runs this compiled file instead of compiling {source}, and {verdict.detail}",
            path,
            evidence=evidence,
        )
    if status == UNREADABLE:
        return finding(
            "TG610",
            f"Python would run this compiled file instead of compiling "
            f"{source}, but it could not be checked: {verdict.detail}",
            path,
            severity=Severity.HIGH,
            evidence=evidence,
        )
    if status == TOO_LARGE:
        return finding(
            "TG002", f"not compared with {source}: {verdict.detail}", path, evidence=evidence
        )
    if status in (UNUSED, NO_SOURCE):
        detail = verdict.detail or "its source is gone"
        return finding(
            "TG612",
            f"stale compiled file that Python does not load ({detail})",
            path,
            evidence=evidence,
        )
    return finding("TG610", f"unexpected pyc verdict {status}", path, severity=Severity.HIGH)
