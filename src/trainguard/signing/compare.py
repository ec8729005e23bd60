"""Compare the signed manifest with the folder as it is now, as findings.

Each path is reduced to a content fingerprint (its digest, or its list of
shard ranges and digests).  A path only in the manifest is removed, one only
on disk is added, one in both with another fingerprint is modified.  When a
path now holds exactly what the manifest recorded for another path whose
content is gone, the pair is reported once as a rename (two swapped names are
two renames) instead of an unrelated removal and addition.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from trainguard.findings import Finding, Severity
from trainguard.rules import rule
from trainguard.signing.hashing import digest_bytes
from trainguard.signing.manifest import Manifest, Resource


@dataclass
class _Content:
    parts: list[Resource] = field(default_factory=list)

    @property
    def fingerprint(self) -> tuple[tuple[tuple[int, int] | None, bytes], ...]:
        return tuple(sorted((r.span, r.digest) for r in self.parts))

    @property
    def size(self) -> int | None:
        if self.parts and self.parts[0].span is not None:
            return max(r.span[1] for r in self.parts if r.span is not None)
        return self.parts[0].size if self.parts else None


def _by_path(manifest: Manifest) -> dict[str, _Content]:
    out: dict[str, _Content] = defaultdict(_Content)
    for r in manifest.resources:
        out[r.path].parts.append(r)
    for name in manifest.empty_files or ():
        out[name] = _Content([_empty_resource(name)])
    return dict(out)


def _empty_resource(name: str) -> Resource:
    return Resource(name, b"", 0)


def _finding(rule_id: str, file: str, message: str, evidence: dict[str, str]) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file, evidence=evidence)


def _modified(path: str, shown: str, was: _Content, now: _Content, algorithm: str) -> Finding:
    evidence = {"algorithm": algorithm}
    if was.size is not None:
        evidence["expected_size"] = str(was.size)
    if now.size is not None:
        evidence["actual_size"] = str(now.size)
    sealed = {r.span: r.digest for r in was.parts if r.span is not None}
    current = {r.span: r.digest for r in now.parts if r.span is not None}
    if not sealed and not current:  # whole files
        evidence["expected_digest"] = was.parts[0].digest.hex()
        evidence["actual_digest"] = now.parts[0].digest.hex()
        message = (
            f"content differs from the sealed digest (sealed {evidence['expected_digest'][:16]}"
            f"..., now {evidence['actual_digest'][:16]}...)"
        )
        return _finding("TG503", shown, message, evidence)
    if not sealed or not current:  # an empty file in a shards manifest, or emptied
        message = "was empty when sealed" if not sealed else "emptied"
        return _finding(
            "TG503", shown, f"content differs from the sealed one ({message})", evidence
        )
    spans = sorted(sealed.keys() | current.keys())
    differing = [s for s in spans if sealed.get(s) != current.get(s)]
    first = differing[0]
    evidence.update(
        first_differing_shard=f"{first[0]}:{first[1]}",
        expected_digest=sealed[first].hex() if first in sealed else "(no such shard)",
        actual_digest=current[first].hex() if first in current else "(no such shard)",
        differing_shards=f"{len(differing)} of {len(sealed)}",
    )
    message = (
        f"{len(differing)} of {len(sealed)} shards differ from the sealed digests, "
        f"first at bytes {first[0]}-{first[1]}"
    )
    return _finding("TG503", shown, message, evidence)


def compare(
    expected: Manifest,
    actual: Manifest,
    display: dict[str, str],
    empty: frozenset[str] = frozenset(),
) -> list[Finding]:
    """Findings for every difference; ``display`` maps a path to how to show it.

    ``empty`` names the empty files on disk: a shards manifest cannot list them
    (an empty file has no shard), so they are matched here by hand.
    """
    algorithm = expected.serialization.algorithm
    was, now = _by_path(expected), _by_path(actual)
    findings: list[Finding] = []
    for p in sorted(empty - now.keys()):
        if p in was or expected.empty_files is not None:
            now[p] = _Content([_empty_resource(p)])  # compared like any other file
        else:
            unlisted = _finding(
                "TG504",
                display.get(p, p),
                "an empty file, which a shards manifest cannot list (model-signing drops them)",
                {},
            )
            findings.append(replace(unlisted, severity=Severity.LOW))
    removed = sorted(was.keys() - now.keys())
    added = sorted(now.keys() - was.keys())
    changed = sorted(p for p in was.keys() & now.keys() if was[p].fingerprint != now[p].fingerprint)

    # Where each sealed content went: paths whose sealed content is no longer there.
    gone: dict[tuple[object, ...], list[str]] = defaultdict(list)
    nothing = digest_bytes(expected.serialization.hash_type, b"")
    for p in removed + changed:
        # Every empty file looks like every other: never call that a rename.
        if was[p].size != 0 and was[p].fingerprint != ((None, nothing),):
            gone[was[p].fingerprint].append(p)
    explained: set[str] = set()
    for p in sorted(added + changed):
        sources = [s for s in gone.get(now[p].fingerprint, []) if s != p]
        if not sources:
            continue
        source = sources[0]
        explained.update((p, source))
        evidence = {"sealed_as": source, "now_at": p, "algorithm": algorithm}
        if now[p].parts and now[p].parts[0].span is None:
            evidence["digest"] = now[p].parts[0].digest.hex()
        findings.append(
            _finding(
                "TG506",
                display.get(p, p),
                f"holds the content sealed as {source!r} (renamed, moved or swapped)",
                evidence,
            )
        )
    for p in changed:
        if p not in explained:
            findings.append(_modified(p, display.get(p, p), was[p], now[p], algorithm))
    for p in removed:
        if p not in explained:
            evidence = {"algorithm": algorithm}
            if was[p].parts and was[p].parts[0].span is None:
                evidence["expected_digest"] = was[p].parts[0].digest.hex()
            if was[p].size is not None:
                evidence["expected_size"] = str(was[p].size)
            findings.append(
                _finding(
                    "TG505",
                    display.get(p, p),
                    "listed in the signed manifest but missing",
                    evidence,
                )
            )
    for p in added:
        if p not in explained:
            evidence = {"algorithm": algorithm}
            if now[p].parts and now[p].parts[0].span is None:
                evidence["actual_digest"] = now[p].parts[0].digest.hex()
            if now[p].size is not None:
                evidence["actual_size"] = str(now[p].size)
            findings.append(
                _finding("TG504", display.get(p, p), "not listed in the signed manifest", evidence)
            )
    return findings
