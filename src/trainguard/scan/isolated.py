"""Native parsers of untrusted files, run in a child process.

Formats that only a C library can read (HDF5 through h5py and libhdf5) are
parsed by a short Python program in a separate interpreter: a file that crashes
or hangs the library (found by fuzzing: libhdf5 segfaults on some damaged
attribute headers) then costs the child, never the scan, and the crash itself
becomes a finding.  The child runs in isolated mode (``-I``: no user site, no
``PYTHON*`` variables, no current folder on the path), with limits on its
address space, CPU time and core dumps, and talks JSON on stdout.  The program
is a fixed string in trainguard: nothing from the file chooses what runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

MEMORY_LIMIT = 4 << 30  # address space of the child: h5py and numpy need about 1 GiB
DEFAULT_TIMEOUT = 60.0

_PRELUDE = """
import resource, sys
def _cap(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
_cap(resource.RLIMIT_CORE, 0)
_cap(resource.RLIMIT_AS, {memory})
_cap(resource.RLIMIT_CPU, {cpu})
"""


@dataclass(frozen=True)
class ChildResult:
    output: dict[str, Any] | None  # the child's JSON document, when it finished
    problem: str | None  # why there is none: a signal, a timeout, bad output


def run_child(program: str, args: list[str], *, timeout: float = DEFAULT_TIMEOUT) -> ChildResult:
    """Run ``program`` (Python source) in an isolated, limited interpreter with ``args``."""
    prelude = _PRELUDE.format(memory=MEMORY_LIMIT, cpu=max(1, int(timeout) + 1))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME")}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", prelude + program, *args],
            capture_output=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return ChildResult(None, f"did not finish within {timeout:.0f} s")
    except OSError as exc:
        return ChildResult(None, f"could not start the isolated parser: {exc}")
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return ChildResult(None, f"crashed ({name})")
    try:
        doc = json.loads(proc.stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        if "MemoryError" in tail[0]:
            return ChildResult(None, "ran out of memory")
        return ChildResult(None, f"failed (exit {proc.returncode}): {tail[0][:200]}")
    if not isinstance(doc, dict):
        return ChildResult(None, "returned something other than a JSON object")
    return ChildResult(doc, None)
