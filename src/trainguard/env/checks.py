"""From what is on disk and what RECORD promises, to findings.

Each function here looks at one kind of evidence (RECORD rows, files no RECORD
lists, ``.pth`` files, customize modules, pyc verdicts, a signed snapshot) and
returns findings; :mod:`trainguard.env.verify` gathers the evidence and
groups the findings into a report.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from importlib.machinery import BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES

from trainguard.env.digests import Digests
from trainguard.env.findings import finding
from trainguard.env.record import InstalledDist, RecordEntry
from trainguard.findings import Finding
from trainguard.rules import rule


@dataclass
class Ownership:
    """Which RECORD rows list each path, and what no-RECORD distributions claim."""

    rows: dict[str, list[tuple[InstalledDist, RecordEntry]]] = field(default_factory=dict)
    claims: list[tuple[str, InstalledDist]] = field(default_factory=list)

    @classmethod
    def of(cls, dists: Iterable[InstalledDist]) -> Ownership:
        own = cls()
        for dist in dists:
            for entry in dist.entries:
                own.rows.setdefault(entry.path, []).append((dist, entry))
            own.claims.extend((c, dist) for c in dist.claims)
        # Longest first, so that the innermost claim wins.
        own.claims.sort(key=lambda item: len(item[0]), reverse=True)
        return own

    def owner(self, path: str) -> InstalledDist | None:
        rows = self.rows.get(path)
        return rows[0][0] if rows else None

    def claimed_by(self, path: str) -> InstalledDist | None:
        for prefix, dist in self.claims:
            if path == prefix or path.startswith(prefix + os.sep):
                return dist
        return None


def record_findings(
    dist: InstalledDist,
    digests: dict[str, Digests],
    errors: dict[str, str],
    present: Container[str],
) -> tuple[list[Finding], list[str]]:
    """Modified and missing files of one distribution, and the files that could not be read."""
    out: list[Finding] = []
    unreadable: list[str] = []
    for entry in dist.entries:
        if entry.digest is None or entry.algorithm is None:
            if (
                entry.path not in present
                and not entry.path.endswith(tuple(BYTECODE_SUFFIXES))
                and (os.path.basename(entry.path) != "RECORD")
                and not os.path.lexists(entry.path)
            ):
                out.append(
                    finding("TG602", f"listed by {dist.label}'s RECORD, but missing", entry.path)
                )
            continue
        got = digests.get(entry.path)
        if got is None:
            reason = errors.get(entry.path)
            if reason is None or not os.path.lexists(entry.path):
                out.append(
                    finding("TG602", f"listed by {dist.label}'s RECORD, but missing", entry.path)
                )
            elif "not a regular file" in reason:
                out.append(
                    finding(
                        "TG601",
                        f"{dist.label} installed a file here; it is now "
                        "something else (not a regular file)",
                        entry.path,
                    )
                )
            else:
                unreadable.append(f"{entry.path}: {reason}")
            continue
        actual = got.values[entry.algorithm]
        if actual == entry.digest:
            continue
        evidence = {
            f"record_{entry.algorithm}": entry.digest.hex(),
            entry.algorithm: actual.hex(),
            "size": str(got.size),
        }
        if entry.size is not None:
            evidence["record_size"] = str(entry.size)
        if "sha256" in got.values:
            evidence["sha256"] = got.values["sha256"].hex()
        out.append(
            Finding(
                "TG601",
                rule("TG601").severity,
                f"content differs from {dist.label}'s RECORD ({entry.algorithm} "
                f"{actual.hex()[:16]}..., RECORD says {entry.digest.hex()[:16]}...)",
                file=entry.path,
                evidence=evidence,
            )
        )
    return out, unreadable


def _module_stem(name: str) -> str | None:
    for suffix in (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES, *BYTECODE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


_MODULE_SUFFIXES = (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES, *BYTECODE_SUFFIXES)


def shadowed_module(path: str, own: Ownership, root: str, later_roots: list[str]) -> str | None:
    """The installed module an unlisted file would be imported instead of, if any.

    The import system's order: in one folder a package beats a module, and an
    extension module beats source and bytecode; across folders, the first one
    on ``sys.path`` (``root`` before each of ``later_roots``) wins.
    """
    folder, name = os.path.split(path)
    stem = _module_stem(name)
    if stem is None:
        return None
    if stem == "__init__":
        folder, stem = os.path.split(folder)
        for suffix in _MODULE_SUFFIXES:
            if own.owner(os.path.join(folder, stem + suffix)) is not None:
                return os.path.join(folder, stem + suffix)
    elif name.endswith(tuple(EXTENSION_SUFFIXES)):
        for suffix in (*SOURCE_SUFFIXES, *BYTECODE_SUFFIXES):
            if own.owner(os.path.join(folder, stem + suffix)) is not None:
                return os.path.join(folder, stem + suffix)
    if folder != root:
        return None
    for later in later_roots:
        for suffix in _MODULE_SUFFIXES:
            for candidate in (
                os.path.join(later, stem + suffix),
                os.path.join(later, stem, "__init__" + suffix),
            ):
                if own.owner(candidate) is not None:
                    return candidate
    return None
