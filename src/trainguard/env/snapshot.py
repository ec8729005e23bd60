"""Signed snapshots of an environment: every file's digest, the interpreter, the platform.

RECORD files sit beside the code they describe, so whoever can edit a module
can edit its RECORD line too.  A snapshot is signed with a key that stays
elsewhere (a DSSE envelope, :mod:`trainguard.signing.dsse`), which RECORD
rewriting cannot forge.  The payload is canonical JSON:

.. code-block:: json

    {"format": "trainguard-env-snapshot", "version": 1, "created": "...",
     "interpreter": {"executable": "...", "version": "...", "sha256": "...", ...},
     "platform": {...}, "roots": ["/.../site-packages"],
     "files": [["/.../site-packages/torch/optim/adam.py", "<sha256 hex>", 1234], ...]}
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import MAGIC_NUMBER
from typing import TYPE_CHECKING, Any

from trainguard.errors import UsageError
from trainguard.findings import Finding, Severity
from trainguard.rules import rule

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey, PublicKey

PAYLOAD_TYPE = "application/vnd.trainguard.env-snapshot+json"
FORMAT = "trainguard-env-snapshot"
VERSION = 1
# 33,000 files of a torch environment make ~5 MB; the envelope adds base64.
MAX_SNAPSHOT_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Snapshot:
    created: str
    interpreter: dict[str, str]
    platform: dict[str, str]
    roots: list[str]
    files: dict[str, tuple[str, int]]  # path -> (sha256 hex, size)
    # Standard library folders, when the snapshot covers them (--stdlib).
    stdlib: list[str] = field(default_factory=list)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def interpreter_info() -> dict[str, str]:
    """What identifies the running interpreter, its binary's digest included."""
    executable = os.path.realpath(sys.executable)
    return {
        "executable": sys.executable,
        "realpath": executable,
        "sha256": _sha256_file(executable),
        "version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "cache_tag": sys.implementation.cache_tag or "",
        "magic": MAGIC_NUMBER.hex(),
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
    }


def platform_info() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "sys_platform": sys.platform,
    }


def make_snapshot(
    roots: list[str], files: dict[str, tuple[str, int]], stdlib: list[str] | None = None
) -> Snapshot:
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Snapshot(
        created, interpreter_info(), platform_info(), list(roots), dict(files), list(stdlib or ())
    )


def encode(snapshot: Snapshot) -> bytes:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "created": snapshot.created,
        "interpreter": snapshot.interpreter,
        "platform": snapshot.platform,
        "roots": snapshot.roots,
        "stdlib": snapshot.stdlib,
        "files": [[p, d, s] for p, (d, s) in sorted(snapshot.files.items())],
    }
    # surrogateescape paths (undecodable names) survive as \udcxx escapes.
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def _str_dict(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} is not an object of strings")
    return dict(value)


def decode(payload: bytes) -> Snapshot:
    """The snapshot in a (verified) payload; ``ValueError`` when it is not one."""
    doc = json.loads(payload)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a trainguard environment snapshot")
    if doc.get("version") != VERSION:
        raise ValueError(f"snapshot version {doc.get('version')!r} is not supported")
    roots = doc.get("roots")
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise ValueError("roots is not a list of paths")
    stdlib = doc.get("stdlib", [])
    if not isinstance(stdlib, list) or not all(isinstance(r, str) for r in stdlib):
        raise ValueError("stdlib is not a list of paths")
    files: dict[str, tuple[str, int]] = {}
    rows = doc.get("files")
    if not isinstance(rows, list):
        raise ValueError("files is not a list")
    for row in rows:
        if not (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], str)
            and isinstance(row[1], str)
            and len(row[1]) == 64
            and isinstance(row[2], int)
            and row[2] >= 0
        ):
            raise ValueError(f"bad file entry {str(row)[:120]}")
        files[row[0]] = (row[1], row[2])
    created = doc.get("created")
    return Snapshot(
        created if isinstance(created, str) else "",
        _str_dict(doc.get("interpreter"), "interpreter"),
        _str_dict(doc.get("platform"), "platform"),
        roots,
        files,
        stdlib,
    )


def write_snapshot(snapshot: Snapshot, private_key: PrivateKey, out: str) -> None:
    from trainguard.signing.dsse import sign_envelope

    envelope = sign_envelope(encode(snapshot), PAYLOAD_TYPE, private_key)
    with open(out, "w", encoding="ascii") as fh:
        json.dump(envelope, fh, indent=1)
        fh.write("\n")


def read_snapshot(path: str, public_key: PublicKey) -> Snapshot:
    """The snapshot at ``path`` once its signature verifies with ``public_key``.

    Raises :class:`~trainguard.signing.errors.VerificationError` (the signature
    or envelope is bad, or the signed payload is not a snapshot) and
    :class:`UsageError` when the file cannot be read at all.
    """
    from trainguard.signing.dsse import verify_envelope
    from trainguard.signing.errors import VerificationError

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the snapshot: {exc.strerror}") from None
    if len(raw) > MAX_SNAPSHOT_BYTES:
        raise UsageError(f"{path}: larger than {MAX_SNAPSHOT_BYTES} bytes")
    try:
        envelope: Any = json.loads(raw)
    except ValueError:
        envelope = None
    payload = verify_envelope(envelope, public_key, PAYLOAD_TYPE)
    try:
        return decode(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        finding = Finding(
            "TG502", rule("TG502").severity, f"the signed snapshot is malformed: {exc}", file=path
        )
        raise VerificationError(finding.message, [finding]) from None


def interpreter_findings(snapshot: Snapshot, where: str) -> list[Finding]:
    """Differences between the snapshot's interpreter and the running one."""
    now = interpreter_info()
    then = snapshot.interpreter
    out: list[Finding] = []
    for key in ("realpath", "version", "magic", "sha256"):
        if then.get(key, "") != now.get(key, ""):
            out.append(
                Finding(
                    "TG618",
                    rule("TG618").severity,
                    f"the interpreter's {key} differs from the snapshot's "
                    f"({then.get(key, '?')} then, {now.get(key, '?')} now)",
                    file=where,
                    evidence={"snapshot": then.get(key, ""), "now": now.get(key, "")},
                )
            )
    return out


def compare_snapshot(
    snapshot: Snapshot,
    sha256: dict[str, str],
    present: dict[str, str],
    unreadable: set[str],
    skip: set[str],
    is_code: Callable[[str], bool],
) -> list[Finding]:
    """Files modified, removed or added since the snapshot.

    ``sha256`` holds the current digest of every readable file, ``present``
    every entry now under the roots, and ``skip`` the paths judged otherwise
    (compiled files, which the interpreter rewrites and the pyc check
    verifies against their source).
    """
    out: list[Finding] = []
    for path, (expected, size) in sorted(snapshot.files.items()):
        if path in skip or path in unreadable:
            continue
        actual = sha256.get(path)
        if actual is None:
            out.append(
                Finding(
                    "TG617",
                    rule("TG617").severity,
                    "listed in the signed snapshot, but gone",
                    file=path,
                    evidence={"snapshot_sha256": expected, "snapshot_size": str(size)},
                )
            )
        elif actual != expected:
            out.append(
                Finding(
                    "TG615",
                    rule("TG615").severity,
                    f"content differs from the signed snapshot (sha256 {actual[:16]}..., the "
                    f"snapshot says {expected[:16]}...)",
                    file=path,
                    evidence={
                        "snapshot_sha256": expected,
                        "sha256": actual,
                        "snapshot_size": str(size),
                    },
                )
            )
    for path in sorted(present):
        if path in snapshot.files or path in skip:
            continue
        severity = Severity.HIGH if is_code(path) else Severity.MEDIUM
        evidence = {"sha256": sha256[path]} if path in sha256 else {}
        out.append(
            Finding(
                "TG616",
                severity,
                "not in the signed snapshot: added since",
                file=path,
                evidence=evidence,
            )
        )
    return out
