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

READY = "trainguard-isolated-ready"
# Limits where the platform has them (POSIX); the program calls ready() once its
# imports are done, so a child that fails before is told from one the file broke.
_PRELUDE = """
import sys
try:
    import resource
except ImportError:
    resource = None
def _cap(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
if resource is not None:
    _cap(resource.RLIMIT_CORE, 0)
    _cap(resource.RLIMIT_AS, {memory})
    _cap(resource.RLIMIT_CPU, {cpu})
def ready():
    sys.stderr.write("{ready}\\n")
    sys.stderr.flush()
"""


@dataclass(frozen=True)
class ChildResult:
    output: dict[str, Any] | None  # the child's JSON document, when it finished
    problem: str | None  # why there is none: a signal, a timeout, bad output
    ready: bool = True  # the program got past its imports (called ready())
    timed_out: bool = False


def run_child(
    program: str,
    args: list[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    pass_fds: tuple[int, ...] = (),
) -> ChildResult:
    """Run ``program`` (Python source) in an isolated, limited interpreter with ``args``.

    ``pass_fds``: open descriptors the child inherits (a file the caller already
    opened, so that the child reads the very file the caller sniffed).
    """
    prelude = _PRELUDE.format(memory=MEMORY_LIMIT, cpu=max(1, int(timeout) + 1), ready=READY)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME")}
    # One thread and few malloc arenas: BLAS libraries that size thread buffers from
    # the core count fail under an address-space limit on many-core machines.
    env.update(
        OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", prelude + program, *args],
            capture_output=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
        )
    except subprocess.TimeoutExpired as exc:
        started = READY.encode() in (exc.stderr or b"")
        return ChildResult(None, f"did not finish within {timeout:.0f} s", started, True)
    except OSError as exc:
        return ChildResult(None, f"could not start the isolated parser: {exc}", False)
    ready = READY.encode() in proc.stderr
    if not ready:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return ChildResult(
            None, f"exit {proc.returncode} before it was ready: {tail[0][:200]}", False
        )
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
