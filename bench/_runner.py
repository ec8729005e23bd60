"""Run one child process and measure it: wall time, peak RSS, exit status, output.

Shared by the benchmarks in this folder.  Stdlib only, so that it runs under any
interpreter (the trainguard venv drives the benchmark; the peers live elsewhere).

Peak RSS needs care.  Linux carries the parent's memory high-water mark into a
forked child through ``exec`` (``ru_maxrss`` is taken from the old address space
too), so a tool started straight from this benchmark - which has torch and numpy
imported - would report at least the benchmark's own size.  Each tool is
therefore started by a tiny trampoline (this file run with ``python -I -S``)
that forks and execs the tool and reports ``wait4`` of that grandchild: its
high-water mark starts from the trampoline's few MiB, not ours.  The figure
covers the tool's main process only (none of the tools forks workers to scan
a single file).  The trampoline also times the tool from fork to exit, so its
own start-up is not billed to the tool.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Tool output beyond this is cut: a verdict never needs more, and a tool that
# prints a gigabyte of warnings must not take the benchmark down with it.
MAX_OUTPUT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ChildResult:
    argv: tuple[str, ...]
    returncode: int  # negative: killed by that signal
    timed_out: bool
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def _read_capped(path: Path) -> str:
    with path.open("rb") as fh:
        data = fh.read(MAX_OUTPUT_BYTES)
    return data.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    # The child leads its own session, so this reaches any helpers it started too.
    # Only ever called while the child is unreaped, so its group id cannot have been
    # recycled for someone else's processes.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_measured(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ChildResult:
    """Run ``argv`` to completion (or ``timeout`` seconds) and measure it."""
    with tempfile.TemporaryDirectory(prefix="tg-bench-out-") as tmp:
        out_path = Path(tmp) / "stdout"
        err_path = Path(tmp) / "stderr"
        stats_path = Path(tmp) / "stats.json"
        trampoline = [sys.executable, "-I", "-S", __file__, str(stats_path), "--", *argv]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            start = time.perf_counter()
            # Output goes to files, not pipes: a chatty tool cannot fill a pipe
            # buffer and stall while we wait.
            proc = subprocess.Popen(
                trampoline,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
            fired = threading.Event()

            def on_timeout() -> None:
                fired.set()
                _kill_group(proc.pid)

            timer = threading.Timer(timeout, on_timeout)
            timer.start()
            try:
                returncode = proc.wait()
            finally:
                timer.cancel()
            outer_seconds = time.perf_counter() - start
        try:
            stats = json.loads(stats_path.read_text())
            seconds = float(stats["seconds"])
            peak = int(stats["peak_rss_bytes"])
            returncode = int(stats["returncode"])
        except (OSError, ValueError, KeyError):
            # Killed on timeout (or the trampoline itself failed): fall back to
            # what we saw from outside.
            seconds, peak = outer_seconds, 0
        return ChildResult(
            argv=tuple(argv),
            returncode=returncode,
            timed_out=fired.is_set(),
            seconds=seconds,
            peak_rss_bytes=peak,
            stdout=_read_capped(out_path),
            stderr=_read_capped(err_path),
        )


def _trampoline(stats_file: str, argv: list[str]) -> int:
    """Fork and exec ``argv``, wait for it, write its time and peak RSS to ``stats_file``."""
    start = time.perf_counter()
    try:
        pid = os.fork()
    except OSError as exc:
        print(f"trampoline: fork failed: {exc}", file=sys.stderr)
        return 127
    if pid == 0:  # the tool
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"trampoline: cannot run {argv[0]}: {exc}", file=sys.stderr)
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    stats = {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * scale, "returncode": code}
    with open(stats_file, "w") as fh:
        json.dump(stats, fh)
    return code if code >= 0 else 128 - code


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``50MB``, ``1048576`` -> bytes (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 50M, 2G, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = human_size(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or "?"),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    # python -I -S _runner.py STATS_FILE -- ARGV...
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: _runner.py STATS_FILE -- COMMAND [ARG...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(_trampoline(sys.argv[1], sys.argv[3:]))
