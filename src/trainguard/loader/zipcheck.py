"""What both safe-loading paths check in a PyTorch zip before loading it.

Every member that is a pickle (by name or by content: ``torch.load`` can be
pointed at any member with ``pickle_file=``) is read into memory once and
scanned, together with the zip's structural anomalies.  Callers load these
in-memory bytes, never a second read of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from trainguard.findings import Finding
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.scanner import Policy, ziplenient
from trainguard.scanner.engine import scan_pickle_bytes
from trainguard.scanner.formats.pickles import strong_sniff
from trainguard.scanner.formats.zips import anomaly_findings, is_storage


@dataclass
class ZipCheck:
    directory: ziplenient.ZipDirectory
    findings: list[Finding] = field(default_factory=list)
    pickles: dict[str, tuple[ziplenient.ZipEntry, bytes]] = field(default_factory=dict)


def check_torch_zip(
    f: BinaryIO, size: int, policy: Policy, limits: Limits = DEFAULT_LIMITS
) -> ZipCheck:
    directory = ziplenient.read_directory(f, size, limits)
    check = ZipCheck(directory, list(anomaly_findings(directory)))
    for entry in directory.entries:
        if entry.data_offset < 0 or is_storage(entry.name):
            continue
        with ziplenient.open_member(f, entry, limits) as member:
            head = member.read(2)
        if not (entry.name.endswith(".pkl") or strong_sniff(head)):
            continue
        with ziplenient.open_member(f, entry, limits) as member:
            data = member.read(limits.max_in_memory_member)
        check.findings += scan_pickle_bytes(
            data, member=entry.name, persistent_ids_expected=True, policy=policy, limits=limits
        )
        check.pickles[entry.name] = (entry, data)
    return check
