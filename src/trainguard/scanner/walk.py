"""Which files a scan of some paths covers: recursion, include/exclude globs, symlinks.

Globs match the path relative to the folder given on the command line (and
the bare file name), ``fnmatch`` style: ``--exclude '*.log'`` or
``--exclude 'runs/*/events.*'``.  A file named directly on the command line is
always scanned.  Folder symlinks are not followed unless asked; when they are,
a link back to a folder already on the way down is reported as a loop rather
than walked forever or silently skipped.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WalkOptions:
    include: Sequence[str] = ()  # when given, only files matching one of these
    exclude: Sequence[str] = ()
    follow_symlinks: bool = False
    # Folders never entered, as resolved paths (the store guard's own quarantine).
    prune: frozenset[str] = frozenset()

    def wants(self, relative: str) -> bool:
        name = relative.rsplit("/", 1)[-1]

        def hit(patterns: Sequence[str]) -> bool:
            return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)

        if self.exclude and hit(self.exclude):
            return False
        return not self.include or hit(self.include)


@dataclass(frozen=True)
class Walked:
    """A file to scan, or (``loop`` set) a folder link that leads back up the tree."""

    path: Path
    loop: str = ""


def walk(
    paths: Iterable[str | os.PathLike[str]], options: WalkOptions | None = None
) -> Iterator[Walked]:
    options = options or WalkOptions()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from _walk_folder(path, options)
        else:
            yield Walked(path)


def _walk_folder(top: Path, options: WalkOptions) -> Iterator[Walked]:
    # (device, inode) of each folder on the current way down: a link to one of
    # them is a loop.  Folders reached twice by different links are fine.
    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterator[Walked]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            yield Walked(folder)  # unreadable: the scan reports why
            return
        for entry in entries:
            full = Path(entry.path)
            relative = full.relative_to(top).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if options.prune and str(full.resolve()) in options.prune:
                    continue
                st = entry.stat(follow_symlinks=False)
                yield from visit(full, ancestors | {(st.st_dev, st.st_ino)})
            elif entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                if not options.follow_symlinks:
                    continue
                if options.prune and str(full.resolve()) in options.prune:
                    continue
                st = os.stat(full)
                if (st.st_dev, st.st_ino) in ancestors:
                    yield Walked(full, loop=os.path.realpath(full))
                    continue
                yield from visit(full, ancestors | {(st.st_dev, st.st_ino)})
            elif options.wants(relative):
                yield Walked(full)

    st = os.stat(top)
    yield from visit(top, frozenset({(st.st_dev, st.st_ino)}))


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files under ``paths``, recursively; folder symlinks are not followed."""
    for walked in walk(paths):
        if not walked.loop:
            yield walked.path


def excluded(path: str, tops: Sequence[str | os.PathLike[str]], options: WalkOptions) -> bool:
    """Whether ``path``, found under one of the folders ``tops``, is filtered out."""
    for top in tops:
        try:
            relative = Path(path).relative_to(Path(top)).as_posix()
        except ValueError:
            continue
        if Path(top).is_dir():
            return not options.wants(relative)
    return False
