"""Version-control folders in a sealed model folder: present, and changed since sealing?

``.git`` is left out of the manifest (model-signing ignores it on both sides,
and a clone's objects change with every fetch), but some of what it holds
runs commands: ``.git/config`` (``core.fsmonitor``, ``core.hooksPath``,
filter and diff drivers, aliases) and ``.git/hooks/*`` run when someone uses
git in the folder, ``.hg/hgrc`` likewise for Mercurial, and
``.github/workflows/*`` when the folder is pushed to a forge.  So sealing records a
SHA-256 of each of those files in the signed manifest (``trainguard.vcs``),
and verifying reports each one added, changed or removed since.

Reads are bounded: at most :data:`MAX_HOOKS` hooks, :data:`MAX_READ` bytes a
file (a larger one is recorded by its size, which then must not change).
Links are recorded as links, never followed.
"""

from __future__ import annotations

import hashlib
import os
import stat

from trainguard.findings import Finding
from trainguard.rules import rule

# Files whose content can make a version-control tool run commands; relative to the root.
CONFIG_FILES = (
    ".git",
    ".git/config",
    ".git/config.worktree",
    ".git/info/attributes",
    ".gitattributes",
    ".gitmodules",
    ".hg",
    ".hg/hgrc",
)
# .github/workflows: left out like .git (model-signing's default), but it runs in CI.
HOOK_FOLDERS = (".git/hooks", ".hg/hooks", ".github/workflows")
VCS_FOLDERS = (".git", ".hg", ".svn", ".bzr", ".jj")
MAX_HOOKS = 256
MAX_READ = 1024 * 1024
MAX_FINDINGS = 50


def _digest(path: str) -> str | None:
    """``sha256:HEX``, ``link``, ``folder``, ``size:N`` (too large) or None when absent."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if not stat.S_ISREG(st.st_mode):
        return "special"
    if st.st_size > MAX_READ:
        return f"size:{st.st_size}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_READ + 1)
    except OSError:
        return "unreadable"
    return "sha256:" + hashlib.sha256(data).hexdigest()


def record(root: str) -> dict[str, str]:
    """The digest of every command-running version-control file under ``root``."""
    if not os.path.isdir(root):
        return {}
    found: dict[str, str] = {}
    for name in CONFIG_FILES:
        digest = _digest(os.path.join(root, name))
        if digest is not None and digest != "folder":
            found[name] = digest
    for folder in HOOK_FOLDERS:
        kind = _digest(os.path.join(root, folder))
        if kind is not None and kind != "folder":
            found[folder] = kind  # a link (hooks kept elsewhere) or a file: never followed
            continue
        try:
            with os.scandir(os.path.join(root, folder)) as it:
                names = sorted(e.name for e in it)
        except OSError:
            continue
        if len(names) > MAX_HOOKS:
            found[folder] = f"entries:{len(names)}"
            names = names[:MAX_HOOKS]
        for hook in names:
            digest = _digest(os.path.join(root, folder, hook))
            if digest is not None:
                found[f"{folder}/{hook}"] = digest
    return found


def present(root: str) -> list[str]:
    return [f for f in VCS_FOLDERS if os.path.lexists(os.path.join(root, f))]


def _finding(rule_id: str, file: str, message: str, evidence: dict[str, str]) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file, evidence=evidence)


def check(root: str, sealed: dict[str, str] | None, shown: str) -> tuple[list[Finding], str | None]:
    """Findings for version-control files changed since sealing, and a note for the output."""
    folders = present(root)
    if sealed is None:
        if not folders:
            return [], None
        message = (
            f"{', '.join(folders)} present but not covered by the seal (sealed without a "
            "record of its hooks and configuration, which can run commands)"
        )
        return [_finding("TG512", shown, message, {"folders": ",".join(folders)})], None
    now = record(root)
    findings: list[Finding] = []
    for name in sorted(sealed.keys() | now.keys()):
        was, is_ = sealed.get(name), now.get(name)
        if was == is_:
            continue
        what = "added" if was is None else "removed" if is_ is None else "changed"
        findings.append(
            _finding(
                "TG511",
                os.path.join(shown, name),
                f"{what} since sealing (version-control configuration or hook: it can run "
                "commands when someone uses the tool in this folder)",
                {"sealed": was or "(absent)", "now": is_ or "(absent)"},
            )
        )
    note = None
    if folders and not findings:
        note = f"{', '.join(folders)} present; its hooks and configuration are as sealed"
    return findings[:MAX_FINDINGS], note
