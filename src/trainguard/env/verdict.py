"""Reusing a whole verify when nothing it looked at has changed.

A re-verify of an unchanged environment still costs a pass over every RECORD
row and every file (parse, sort, look up, compare): about a second for a
torch environment even when every digest comes from the cache.  Instead, the
verify fingerprints what it is about to look at, before it reads anything:

* every entry under the site (and standard library) folders, with its kind
  and its stat key (inode, size, mtime, ctime: see :class:`trainguard.filestate.Identity`), and the
  folders that could not be listed;
* the customize modules on the search path, with their stat keys;
* the files RECORD rows name outside those folders (console scripts), with
  their stat keys or their absence;
* the interpreter, trainguard's version and the verify's options.

Every file a verify reads is one of these, so the fingerprint is unchanged
only if every input is, and then the previous verdict is the verdict.  Taking
the fingerprint *before* the reads matters: a file changed while the verify
runs makes the stored fingerprint differ from the next run's, never match a
result computed from older content.

A folder reached through a link is not walked, so the fingerprint cannot see
inside it: then nothing is reused.  The allowlist is applied afresh each
time, and ``--full`` or ``--no-cache`` never reuse a verdict.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from trainguard.digest_cache import interpreter_tag
from trainguard.env.pth import startup_modules
from trainguard.env.sort import Scope, walk_scope
from trainguard.env.venvfiles import fingerprint_paths, venv_of
from trainguard.env.walk import LINK
from trainguard.filestate import Entry, Identity, entry_for, settled
from trainguard.findings import Finding, Severity

# 2, 3: .pth path entries, launchers, metadata-only hooks and an editable install's own
# imported module are judged; 4: loader-runnable unlisted files (TG627), foreign RECORD
# rows (TG628), linked packages (TG604); 5: entry-point groups installed code loads
# (TG625); 6: the venv's own files (TG629); a verdict reached without them is never reused.
FORMAT = 6


@dataclass
class Observed:
    """What the verify's folders held before it read anything."""

    present: dict[str, str]  # path -> kind, under the site folders
    stdlib: dict[str, str]  # the same under the standard library folders
    walk_errors: dict[str, str]
    # The stat of every walked path and customize module, for the checks to reuse
    # and for :func:`consistent` to compare with what was read.
    entries: dict[str, Entry | None]
    folders: set[str]
    startup: list[tuple[str, str, int]]
    digest: str | None  # None: the folders cannot be fingerprinted (a linked folder)
    taken_at: float  # Unix time, when the walk began
    # Every file's last change is older than the racy window (see filestate.RACY_NS):
    # only then may the verdict be stored.
    settled: bool


def _key_line(path: str, kind: str, key: Identity | None) -> str:
    return f"{path}\0{kind}\0{'-' if key is None else key.text()}\n"


def _lstat_key(path: str) -> Identity | None:
    try:
        return Identity.of(os.lstat(path))
    except OSError:
        return None


def observe(scope: Scope) -> Observed:
    """Walk the scope and stat everything in it: one lstat per entry."""
    taken_at_ns = time.time_ns()
    errors: dict[str, str] = {}
    folders: list[str] = []
    present, stdlib = walk_scope(scope, errors, folders)
    entries: dict[str, Entry | None] = {}
    lines: list[str] = []
    linked_folder = False
    newest = 0
    for walked in (present, stdlib):
        for path in sorted(walked):
            kind = walked[path]
            entry = entries[path] = entry_for(path)
            if entry is not None:
                newest = max(newest, entry.identity.ctime_ns)
                if kind == LINK:
                    if not entry.regular:
                        linked_folder = True  # its content is outside the fingerprint
                    # The link itself too: a retargeted link is a change even when
                    # the new target has the old one's stat.
                    lines.append(_key_line(path, "link-itself", _lstat_key(path)))
            lines.append(_key_line(path, kind, entry.identity if entry is not None else None))
        lines.append("\n")
    # Folders matter by their names (an empty dist-info, a folder named like a
    # module): the files' lines already cover what is in them.
    lines.extend(f"{folder}\0folder\n" for folder in sorted(folders))
    for folder, reason in sorted(errors.items()):
        lines.append(f"{folder}\0unlistable\0{reason}\n")
    startup = startup_modules(scope.search)
    for module, path, position in startup:
        entry = entries[path] = entry_for(path)
        newest = max(newest, entry.identity.ctime_ns if entry is not None else 0)
        lines.append(_key_line(path, f"{module}@{position}", entry.identity if entry else None))
    # The venv's own start-up files (pyvenv.cfg, bin/python*, bin/activate*: env.venvfiles).
    for venv in dict.fromkeys(v for v in map(venv_of, scope.roots) if v is not None):
        for path in fingerprint_paths(venv):
            entry = entries[path] = entry_for(path)
            newest = max(newest, entry.identity.ctime_ns if entry is not None else 0)
            lines.append(_key_line(path, "venv", entry.identity if entry is not None else None))
            lines.append(_key_line(path, "venv-itself", _lstat_key(path)))
    digest = None
    if not linked_folder:
        data = "".join(lines).encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(data).hexdigest()
    settled_all = settled(newest, taken_at_ns)
    taken_at = taken_at_ns / 1e9
    return Observed(
        present, stdlib, errors, entries, set(folders), startup, digest, taken_at, settled_all
    )


def consistent(
    observed: Observed,
    reads: dict[str, Identity],
    outside: dict[str, Identity | None],
    meta_dirs: Iterable[str],
) -> bool:
    """Whether every file a verify read is the file it fingerprinted.

    A folder swapped by a rename while the verify reads (and swapped back
    after) keeps each file's own stat; the file read is then another inode,
    whose stat differs from the one taken before.  Such a verdict is reported
    but never stored.  So is one that found a distribution whose metadata was
    not there when the fingerprint was taken.
    """
    for meta_dir in meta_dirs:
        if meta_dir not in observed.folders and meta_dir not in observed.present:
            return False
    for path, key in reads.items():
        entry = observed.entries.get(path)
        if entry is not None:
            if entry.identity != key:
                return False
        elif outside.get(path) != key:
            return False
    return True


def outside_digest(keys: dict[str, Identity | None]) -> str:
    """A digest of the stat keys (or absence) of files outside the walked folders."""
    lines = [_key_line(path, "outside", key) for path, key in sorted(keys.items())]
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def outside_settled(keys: dict[str, Identity | None], taken_at: float) -> bool:
    now_ns = int(taken_at * 1e9)
    return all(key is None or settled(key.ctime_ns, now_ns) for key in keys.values())


def outside_now(paths: Iterable[str]) -> str:
    keys: dict[str, Identity | None] = {}
    for path in paths:
        entry = entry_for(path)
        keys[path] = entry.identity if entry is not None else None
    return outside_digest(keys)


@dataclass
class DistSummary:
    meta_dir: str
    kind: str  # "distribution NAME VERSION[, no RECORD]"
    size: int
    unreadable: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    """What a verify concluded, as much as its report needs."""

    dists: list[DistSummary]
    findings: list[Finding]  # before the allowlist
    owners: dict[str, str]  # a finding's file -> the meta_dir of its distribution
    file_errors: dict[str, str]
    walk_errors: dict[str, str]
    files: int
    pycs_checked: int
    # Set on a verdict that is reused: when the verify that made it began.
    made_at: float | None = None


def options_tag(scope: Scope) -> dict[str, Any]:
    """Everything besides the files that a verdict depends on."""
    from trainguard._version import __version__

    return {
        "format": FORMAT,
        "trainguard": __version__,
        "interpreter": [os.path.realpath(sys.executable), interpreter_tag()],
        "roots": list(scope.roots),
        "search": list(scope.search),
        "stdlib": list(scope.stdlib),
        "check_pyc": scope.check_pyc,
    }


def variant_of(tag: dict[str, Any]) -> str:
    """A short name for one set of options (part of the verdict file's name)."""
    text = json.dumps(tag, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _finding_doc(item: Finding) -> dict[str, Any]:
    doc = asdict(item)
    doc["severity"] = item.severity.name
    return doc


def _finding_from(doc: Any) -> Finding:
    if not isinstance(doc, dict):
        raise ValueError("a finding is not an object")
    evidence = doc.get("evidence", {})
    if not isinstance(evidence, dict):
        raise ValueError("evidence is not an object")
    return Finding(
        rule=str(doc["rule"]),
        severity=Severity[str(doc["severity"])],
        message=str(doc["message"]),
        file=str(doc.get("file", "")),
        member=str(doc.get("member", "")),
        offset=doc.get("offset") if isinstance(doc.get("offset"), int) else None,
        trigger=str(doc.get("trigger", "")),
        evidence=evidence,
    )


def to_doc(
    tag: dict[str, Any], observed: Observed, outside: dict[str, Identity | None], verdict: Verdict
) -> dict[str, Any]:
    """The verdict as stored; ``outside`` holds the stats taken before those files were read."""
    return {
        "tag": tag,
        "fingerprint": observed.digest,
        "outside": sorted(outside),
        "outside_fingerprint": outside_digest(outside),
        "made_at": observed.taken_at,
        "dists": [asdict(d) for d in verdict.dists],
        "findings": [_finding_doc(f) for f in verdict.findings],
        "owners": verdict.owners,
        "file_errors": verdict.file_errors,
        "walk_errors": verdict.walk_errors,
        "files": verdict.files,
        "pycs_checked": verdict.pycs_checked,
    }


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of strings")
    return value


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("not a map of strings")
    return value


def reusable(doc: Any, tag: dict[str, Any], observed: Observed) -> Verdict | None:
    """The stored verdict, if it was made for these options and nothing changed since."""
    if observed.digest is None or not isinstance(doc, dict):
        return None
    if doc.get("tag") != tag or doc.get("fingerprint") != observed.digest:
        return None
    try:
        return _verdict_from(doc)
    except Exception:  # a cache document we cannot use is a miss, whatever is wrong
        return None


def _verdict_from(doc: dict[str, Any]) -> Verdict | None:
    outside = doc.get("outside")
    if not isinstance(outside, list) or not all(isinstance(p, str) for p in outside):
        return None
    if outside_now(outside) != doc.get("outside_fingerprint"):
        return None
    try:
        dists = [
            DistSummary(
                str(d["meta_dir"]), str(d["kind"]), int(d["size"]), _str_list(d["unreadable"])
            )
            for d in doc["dists"]
        ]
        return Verdict(
            dists=dists,
            findings=[_finding_from(f) for f in doc["findings"]],
            owners=_str_map(doc["owners"]),
            file_errors=_str_map(doc["file_errors"]),
            walk_errors=_str_map(doc["walk_errors"]),
            files=int(doc["files"]),
            pycs_checked=int(doc["pycs_checked"]),
            made_at=float(doc["made_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
