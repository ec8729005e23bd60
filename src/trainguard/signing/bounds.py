"""Which files verification hashes: none whose digest cannot change the verdict.

An unlisted file is a finding whatever it holds; its digest only matters when
it may be a listed file under a new name (a rename is reported as such).  A
renamed file keeps its size, so an unlisted file is hashed only when its size
equals the sealed size of a listed file that is gone (missing, or changed in
size).  Likewise a listed file whose size differs from the sealed one is
modified whatever its digest.  Everything else is reported from its stat
alone, so a 16 TiB sparse file dropped into the folder costs one ``lstat``.

Two exceptions keep the reports as useful as before: unlisted files up to
:data:`ALWAYS_HASH_UP_TO` are hashed anyway (their digest is evidence and costs
little), up to :data:`EVIDENCE_BUDGET` bytes in all; and when the manifest does
not record sizes (model-signing's files manifests) an unlisted file up to
:data:`RENAME_PROBE_MAX` is hashed if some listed file is missing, so that
renames are still recognised.  Rename candidates are capped too: for each
size, no more are hashed than listed files of that size are gone (in name
order), so a thousand planted copies of a missing shard's size cost one hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainguard.filestate import Entry
from trainguard.findings import Finding
from trainguard.rules import rule
from trainguard.signing.manifest import Manifest

ALWAYS_HASH_UP_TO = 1024 * 1024
EVIDENCE_BUDGET = 256 * 1024 * 1024
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
    # How many listed files of each size are gone (None: of unknown size): each
    # can explain at most one renamed file.
    gone: dict[int | None, int] = {}
    for path, sealed in sizes.items():
        entry = files.get(path)
        if entry is None or (sealed is not None and entry.identity.size != sealed):
            gone[sealed] = gone.get(sealed, 0) + 1
    evidence_left = EVIDENCE_BUDGET

    def worth_hashing(size: int) -> bool:
        nonlocal evidence_left
        for key in (size, None):
            if gone.get(key, 0) > 0 and (key is not None or size <= RENAME_PROBE_MAX):
                gone[key] -= 1
                return True
        if size <= min(ALWAYS_HASH_UP_TO, evidence_left):
            evidence_left -= size
            return True
        return False

    out = Plan()
    for name, entry in files.items():
        size = entry.identity.size
        listed = name in sizes
        sealed = sizes.get(name)
        if listed and (sealed is None or sealed == size):
            out.hash[name] = entry
            continue
        if worth_hashing(size):
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
                "file of this size is gone, or as many candidates were hashed already)"
            )
            out.findings.append(_finding("TG504", shown[name], message, evidence))
    return out


def _finding(rule_id: str, file: str, message: str, evidence: dict[str, str]) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file, evidence=evidence)
