"""Code that runs at every interpreter start: ``.pth`` lines and customize modules.

``site`` executes each line of a ``.pth`` file (in a site folder) that starts
with ``import`` followed by a space or a tab, and appends every other
non-comment line to ``sys.path``.  It then imports ``sitecustomize`` and
``usercustomize`` from anywhere on ``sys.path``.  These files are read as text
here: nothing in them is executed or imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.machinery import BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES

from trainguard.filestate import Identity

# A .pth file is a few lines; setuptools' largest is under 200 bytes.
MAX_PTH_BYTES = 1024 * 1024
STARTUP_MODULES = ("sitecustomize", "usercustomize")


@dataclass(frozen=True)
class PthFile:
    path: str
    exec_lines: list[str]
    path_lines: list[str]
    error: str | None = None
    key: Identity | None = None  # the stat of the file read (not of whatever is there now)


def executes(line: str) -> bool:
    """Whether ``site`` would ``exec`` this line (the same test as ``site.addpackage``)."""
    return line.startswith(("import ", "import\t"))


def _decode(raw: bytes) -> str:
    # site reads .pth files as UTF-8 (3.13 strips a BOM; older versions use
    # the locale's encoding and stop at the first bad byte).  To report every
    # line that any version would run, the BOM is dropped and bad bytes are
    # kept as escapes rather than dropping the file.
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def read_pth(path: str) -> PthFile:
    try:
        with open(path, "rb") as fh:
            key = Identity.of(os.fstat(fh.fileno()))
            raw = fh.read(MAX_PTH_BYTES + 1)
    except OSError as exc:
        return PthFile(path, [], [], exc.strerror or str(exc))
    exec_lines: list[str] = []
    path_lines: list[str] = []
    for line in _decode(raw[:MAX_PTH_BYTES]).splitlines():
        if executes(line):
            exec_lines.append(line.rstrip())
        elif line.strip() and not line.startswith("#"):
            path_lines.append(line.rstrip())
    error = (
        f"larger than {MAX_PTH_BYTES} bytes; the rest was not read"
        if (len(raw) > MAX_PTH_BYTES)
        else None
    )
    return PthFile(path, exec_lines, path_lines, error, key)


def pth_files(site_folder: str) -> list[str]:
    """The ``.pth`` files ``site`` processes in one site folder (it does not recurse)."""
    try:
        names = sorted(os.listdir(site_folder))
    except OSError:
        return []
    # site skips names starting with a dot since 3.13; older versions read
    # them, so they are reported too.
    return [
        os.path.join(site_folder, n)
        for n in names
        if n.endswith(".pth") and os.path.isfile(os.path.join(site_folder, n))
    ]


def _module_files(folder: str, name: str) -> list[str]:
    """Files through which ``import name`` could load code from ``folder``."""
    candidates = [
        os.path.join(folder, name + suffix)
        for suffix in (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES, *BYTECODE_SUFFIXES)
    ]
    package = os.path.join(folder, name)
    candidates += [
        os.path.join(package, "__init__" + suffix)
        for suffix in (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES, *BYTECODE_SUFFIXES)
    ]
    return [c for c in candidates if os.path.isfile(c)]


def startup_modules(search_path: list[str]) -> list[tuple[str, str, int]]:
    """(module name, file, position on the path) of every customize module found.

    Only the first one of each name runs, but any other becomes the one that
    runs as soon as the path changes, so all are reported.
    """
    found: list[tuple[str, str, int]] = []
    for position, folder in enumerate(search_path):
        for name in STARTUP_MODULES:
            for file in _module_files(folder, name):
                found.append((name, file, position))
    return found
