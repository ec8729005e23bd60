"""List the files of a model folder, as model-signing names them.

Names are POSIX paths relative to the folder; a single-file model has the one
name ``"."`` (model-signing's convention).  Links are never followed: a
symbolic link, or anything that is neither a regular file nor a folder, is
returned as *unsafe* so that sealing refuses it and verification reports it.

Ignore rules are model-signing's (an ignored path covers everything below
it) plus glob patterns matched against the relative name, such as
``*.tmp`` or ``logs/*``.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import stat
from dataclasses import dataclass, field

from trainguard.errors import UsageError
from trainguard.filestate import Entry, Identity
from trainguard.signing.errors import SealError

# Ignored by model-signing on both signing and verifying unless told otherwise,
# so trainguard ignores them too: otherwise each side would see files the
# other left out.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
DEFAULT_SIGNATURE_NAME = "model.sig"
# A manifest holds at most 1,000,000 resources (manifest.MAX_RESOURCES); a folder
# with many more entries cannot be a sealed model, and listing it is unbounded work.
MAX_ENTRIES = 2_000_000
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Tree:
    root: str
    single_file: bool
    # Relative POSIX name ("." for a single-file model) -> the file, in name order.
    files: dict[str, Entry] = field(default_factory=dict)
    # (relative name, why) for links, devices, sockets, unreadable folders...
    unsafe: list[tuple[str, str]] = field(default_factory=list)
    # Top-most names skipped because a glob pattern (not a plain path) matched.
    pattern_ignored: list[str] = field(default_factory=list)
    # Top-most names skipped because a plain ignore path matched.
    path_ignored: list[str] = field(default_factory=list)


def is_pattern(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


@dataclass(frozen=True)
class IgnoreRules:
    paths: tuple[str, ...] = ()  # exact relative paths (and what lies below them)
    patterns: tuple[str, ...] = ()  # globs over the relative name or any of its parents

    def matches(self, name: str) -> bool:
        return self.matches_path(name) or self.matches_pattern(name)

    def matches_path(self, name: str) -> bool:
        return any(name == path or name.startswith(path + "/") for path in self.paths)

    def matches_pattern(self, name: str) -> bool:
        if self.patterns:
            parts = name.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            for pattern in self.patterns:
                if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                    return True
        return False


def normalize_ignore(text: str) -> str:
    """A relative POSIX path or pattern: ``./a//b/`` -> ``a/b``; ``..`` is refused."""
    parts = [p for p in text.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if text.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"ignore path {text!r} must be relative to the model folder")
    return "/".join(parts)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def walk(root: str, ignore: IgnoreRules) -> Tree:
    """Every regular file under ``root`` (a folder or one file), links refused."""
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise UsageError(f"{root}: {exc.strerror or exc}") from None
    if stat.S_ISREG(st.st_mode):
        tree = Tree(root=root, single_file=True)
        tree.files["."] = Entry(root, Identity.of(st), True, False)
        return tree
    if not stat.S_ISDIR(st.st_mode):
        # The user's own argument: a usage error with a message (exit 2), not a crash.
        raise UsageError(f"{root}: {_kind(st.st_mode)}, not a file or folder")
    tree = Tree(root=root, single_file=False)
    pending = [("", root)]
    seen = 0
    while pending:
        prefix, folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                # Never more than the cap in memory, even from one vast folder.
                entries = list(itertools.islice(it, MAX_ENTRIES - seen + 1))
        except OSError as exc:
            tree.unsafe.append((prefix or ".", f"a folder that cannot be listed ({exc.strerror})"))
            continue
        seen += len(entries)
        if seen > MAX_ENTRIES:
            raise SealError(f"{root}: more than {MAX_ENTRIES:,} entries; refusing to walk on")
        entries.sort(key=lambda e: e.name)
        for entry in entries:
            name = f"{prefix}{entry.name}"
            if ignore.matches_path(name):
                tree.path_ignored.append(name)
                continue
            if ignore.matches_pattern(name):
                tree.pattern_ignored.append(name)
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError as exc:  # gone since the listing, or unreadable
                tree.unsafe.append((name, f"cannot be examined ({exc.strerror})"))
                continue
            if stat.S_ISDIR(est.st_mode):
                pending.append((name + "/", entry.path))
            elif stat.S_ISREG(est.st_mode):
                tree.files[name] = Entry(entry.path, Identity.of(est), True, False)
            elif stat.S_ISLNK(est.st_mode):
                try:
                    target = os.readlink(entry.path)[:200]
                except OSError:
                    target = "?"
                tree.unsafe.append((name, f"a symbolic link to {target!r}"))
            else:
                tree.unsafe.append((name, _kind(est.st_mode)))
    tree.files = dict(sorted(tree.files.items()))
    return tree


def unsafe_name(name: str) -> str | None:
    """Why a name read from a manifest cannot be a file inside the folder, or None."""
    if name == ".":
        return None
    if not name or name.startswith("/") or "\x00" in name:
        return "absolute or empty"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "climbs out of the folder or is not in normal form"
    return None
