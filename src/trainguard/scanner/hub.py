"""``hf://ORG/REPO[@REVISION]``: scan a repository of the Hugging Face Hub.

The repository is fetched with huggingface_hub's ``snapshot_download`` (the
optional extra ``trainguard[hub]``), which honours ``HF_TOKEN``, ``HF_HOME`` /
``HF_HUB_CACHE`` and reuses the local cache; offline (``--offline`` or
``HF_HUB_OFFLINE=1``) only the cache is read.  The snapshot folder is then
scanned like any folder, and every path in the report is rewritten to
``hf://ORG/REPO@COMMIT/FILE``: the commit the revision resolved to is pinned,
so a branch that moves after the scan cannot be mistaken for what was checked.
Nothing downloaded is imported or run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainguard.errors import MissingExtraError, TrainguardError, UsageError
from trainguard.findings import FileResult, Finding, ScanReport
from trainguard.rules import finding

SCHEME = "hf://"
# The Hub's own rule for names: letters, digits, "-", "_", "."; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "ON", "YES", "TRUE")


class HubError(TrainguardError):
    """The repository could not be resolved or downloaded (CLI exit code 2)."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Snapshot:
    """A revision of a Hub repository resolved to a commit, and its local folder."""

    ref: HubRef
    commit: str  # 40 hex digits, or "" when the folder's name does not say
    folder: Path
    offline: bool

    @property
    def label(self) -> str:
        return f"{SCHEME}{self.ref.repo_id}@{self.commit or self.ref.revision or 'unknown'}"


def is_hub_path(text: str) -> bool:
    return text.startswith(SCHEME)


def parse(text: str) -> HubRef:
    """``hf://ORG/REPO[@REVISION]`` -> :class:`HubRef`; a malformed one is a usage error."""
    if not is_hub_path(text):
        raise UsageError(f"{text}: not an {SCHEME} address")
    repo_id, at, revision = text[len(SCHEME) :].rstrip("/").partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"{text}: expected {SCHEME}ORG/REPO or {SCHEME}ORG/REPO@REVISION")
    if at and not revision:
        raise UsageError(f"{text}: empty revision after '@'")
    return HubRef(repo_id, revision or None)


def offline_requested(flag: bool = False) -> bool:
    """``--offline``, or huggingface_hub's own switch ``HF_HUB_OFFLINE``."""
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def download(ref: HubRef, *, offline: bool, cache_dir: str | Path | None = None) -> Snapshot:
    """The snapshot folder of ``ref``: from the cache, or downloaded into it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtraError("huggingface_hub", "hub", f"scanning {ref}") from None
    try:
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as exc:  # the library's errors vary by version; all mean "not resolved"
        raise HubError(_explain(ref, offline, exc)) from exc
    if not isinstance(folder, str):  # only a dry run returns file descriptions
        raise HubError(f"{ref}: huggingface_hub returned no snapshot folder")
    path = Path(folder)
    commit = path.name if _COMMIT.fullmatch(path.name) else ""
    return Snapshot(ref, commit, path, offline)


def _explain(ref: HubRef, offline: bool, exc: Exception) -> str:
    kind = type(exc).__name__
    if offline and kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (
            f"{ref}: not in the local Hugging Face cache and offline mode is on "
            "(--offline or HF_HUB_OFFLINE); download it first or scan without --offline"
        )
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"{ref}: repository not found or not accessible (set HF_TOKEN for a private one)"
    if kind == "RevisionNotFoundError":
        return f"{ref}: no such revision"
    return f"{ref}: could not be downloaded ({kind}: {exc})"


@dataclass
class ResolvedPaths:
    """The scan's paths with every ``hf://`` address replaced by its snapshot folder."""

    paths: list[str]
    snapshots: list[Snapshot] = field(default_factory=list)

    def relabel(self, report: ScanReport) -> None:
        """Rewrite snapshot paths to ``hf://ORG/REPO@COMMIT/...`` and pin each commit."""
        for result in report.files:
            path = self._label(result.path)
            if path != result.path:
                result.path = path
                result.findings = [replace(f, file=self._label(f.file)) for f in result.findings]
        pins = [FileResult(s.label, "huggingface-snapshot", 0, [_pin(s)]) for s in self.snapshots]
        report.files[:0] = pins

    def _label(self, path: str) -> str:
        for snap in self.snapshots:
            root = str(snap.folder)
            if path == root:
                return snap.label
            if path.startswith(root + os.sep):
                return snap.label + "/" + path[len(root) + 1 :].replace(os.sep, "/")
        return path


def resolve_paths(
    paths: Iterable[str], *, offline: bool = False, cache_dir: str | Path | None = None
) -> ResolvedPaths:
    """Download (or find in the cache) every ``hf://`` path; other paths pass through."""
    offline = offline_requested(offline)
    resolved = ResolvedPaths([])
    for text in paths:
        if is_hub_path(text):
            snap = download(parse(text), offline=offline, cache_dir=cache_dir)
            resolved.snapshots.append(snap)
            resolved.paths.append(str(snap.folder))
        else:
            resolved.paths.append(text)
    return resolved


def _pin(snap: Snapshot) -> Finding:
    requested = snap.ref.revision or "the default branch"
    commit = snap.commit or "an unknown commit"
    source = "the local cache only (offline)" if snap.offline else "the Hub or its local cache"
    evidence = {
        "repository": snap.ref.repo_id,
        "requested_revision": snap.ref.revision or "",
        "commit": snap.commit,
        "snapshot_folder": str(snap.folder),
        "offline": str(snap.offline).lower(),
    }
    message = f"{snap.ref.repo_id}: {requested} resolved to {commit}, read from {source}"
    if snap.offline:
        message += "; files missing from the cache were not scanned"
    return finding("TG1410", message, file=snap.label, evidence=evidence)
