"""Which files verification hashes: none whose digest cannot change the verdict.

An unlisted file is a finding whatever it holds; its digest only matters when
it may be a listed file under a new name (a rename is reported as such).  A
renamed file keeps its size, so an unlisted file is hashed only when its size
equals the sealed size of a listed file that is gone (missing, or changed in
size).  Likewise a listed file whose size differs from the sealed one is
modified whatever its digest.  Everything else is reported from its stat
alone, so a 16 TiB sparse file dropped into the folder costs one ``lstat``.

Two exceptions keep the reports as useful as before: files up to
:data:`ALWAYS_HASH_UP_TO` are hashed anyway (their digest is evidence and costs
nothing), and when the manifest does not record sizes (model-signing's files
manifests) an unlisted file up to :data:`RENAME_PROBE_MAX` is hashed if some
listed file is missing, so that renames are still recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainguard.filestate import Entry
from trainguard.findings import Finding
from trainguard.rules import rule
from trainguard.signing.manifest import Manifest

ALWAYS_HASH_UP_TO = 1024 * 1024
RENAME_PROBE_MAX = 64 * 1024**3


def sealed_sizes(manifest: Manifest) -> dict[str, int | None]:
    """Each listed path's sealed size, None where the manifest does not say."""
    sizes: dict[str, int | None] = {}
    for r in manifest.resources:
        if r.span is not None:
            sizes[r.path] = max(sizes.get(r.path) or 0, r.span[1])
        else:
            sizes[r.path] = r.size
    for name in manifest.empty_files or ():
        sizes[name] = 0
    return sizes


@dataclass
class Plan:
    hash: dict[str, Entry] = field(default_factory=dict)  # what to hash, by relative name
    unhashed_listed: set[str] = field(default_factory=set)  # listed, known changed by size
    findings: list[Finding] = field(default_factory=list)


def plan(files: dict[str, Entry], expected: Manifest, shown: dict[str, str]) -> Plan:
    """Split the walked ``files`` into those to hash and those judged by size."""
    sizes = sealed_sizes(expected)
    algorithm = expected.serialization.algorithm
    gone: set[int] = set()
    unknown_gone = False
    for path, sealed in sizes.items():
        entry = files.get(path)
        if entry is None or (sealed is not None and entry.identity.size != sealed):
            if sealed is None:
                unknown_gone = True
            else:
                gone.add(sealed)

    def worth_hashing(size: int) -> bool:
        return (
            size <= ALWAYS_HASH_UP_TO or size in gone or (unknown_gone and size <= RENAME_PROBE_MAX)
        )

    out = Plan()
    for name, entry in files.items():
        size = entry.identity.size
        listed = name in sizes
        sealed = sizes.get(name)
        if (listed and (sealed is None or sealed == size)) or worth_hashing(size):
            out.hash[name] = entry
            continue
        evidence = {"algorithm": algorithm, "actual_size": str(size)}
        if listed:
            out.unhashed_listed.add(name)
            evidence["expected_size"] = str(sealed)
            message = (
                f"size differs from the sealed one (sealed {sealed:,} bytes, now {size:,}): "
                "modified (not hashed)"
            )
            out.findings.append(_finding("TG503", shown[name], message, evidence))
        else:
            message = (
                f"not listed in the signed manifest ({size:,} bytes; not hashed: no listed "
                "file that is gone had this size)"
            )
            out.findings.append(_finding("TG504", shown[name], message, evidence))
    return out


def _finding(rule_id: str, file: str, message: str, evidence: dict[str, str]) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file, evidence=evidence)
