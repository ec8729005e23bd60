"""How fast is ``trainguard env verify`` on a real environment (torch included)?

Measures, on one site-packages folder (default: the one of the interpreter that
runs this script, i.e. trainguard's own .venv with torch), each in a subprocess
with the page cache warm (every file is read once first), median of
``--repeat`` runs:

- the floor: sha256 of every file, in Python (hashlib, 1 MiB reads, one thread
  per core) and with coreutils ``sha256sum`` (one process per core);
- a naive RECORD check, the script anyone would write: for each RECORD row,
  read the file and compare its sha256, one file at a time, no other check;
- ``trainguard env verify --no-pyc --no-cache``: RECORD hashes, unlisted
  files, .pth files, customize modules, no digest cache;
- ``trainguard env verify --no-cache``: the same plus the pyc check (every
  cached .pyc compared with its freshly compiled source): the cold full run;
- the pyc check alone, through the library (``check_pycs`` on every pyc);
- ``trainguard env verify`` re-run with the digest cache warm and nothing
  changed (the case of a job's start-up check);
- ``pip check`` for scale only: it checks declared dependencies, not files.

    /work/main/.venv/bin/python bench/env_bench.py
    /work/main/.venv/bin/python bench/env_bench.py --repeat 5 --json env-bench.json
    /work/main/.venv/bin/python bench/env_bench.py --path /opt/venv/lib/python3.11/site-packages

Peak RSS is the main process's (the pyc check's worker processes are not
included).  Times include interpreter start-up and imports (about 0.2 s for
trainguard); the library-call rows do not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _runner import ChildResult, human_size, machine_info, run_measured  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TIMEOUT = 1800.0

FLOOR_PY = r"""
import hashlib, os, sys, time
from concurrent.futures import ThreadPoolExecutor
root = sys.argv[1]
paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
paths = [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]
def h(p):
    d = hashlib.sha256(); buf = bytearray(1 << 20); mv = memoryview(buf)
    with open(p, 'rb', buffering=0) as f:
        while n := f.readinto(mv):
            d.update(mv[:n])
    return d.digest()
t = time.perf_counter()
with ThreadPoolExecutor(os.cpu_count()) as ex:
    list(ex.map(h, paths, chunksize=64))
print(len(paths), time.perf_counter() - t)
"""

NAIVE_RECORD = r"""
import base64, csv, hashlib, os, sys
root = sys.argv[1]
bad = 0
for name in os.listdir(root):
    record = os.path.join(root, name, 'RECORD')
    if not name.endswith('.dist-info') or not os.path.isfile(record):
        continue
    with open(record, newline='') as fh:
        for path, digest, _ in csv.reader(fh):
            if not digest:
                continue
            algo, _, want = digest.partition('=')
            try:
                with open(os.path.join(root, path), 'rb') as f:
                    got = hashlib.new(algo, f.read()).digest()
            except OSError:
                bad += 1
                continue
            bad += base64.urlsafe_b64encode(got).rstrip(b'=').decode() != want
print(bad)
"""

PYC_ONLY = r"""
import os, sys, time
from trainguard.env.pyc import PycJob, check_pycs, optimization_of
root = sys.argv[1]
jobs = []
for d, _, fs in os.walk(root):
    if os.path.basename(d) != '__pycache__':
        continue
    for f in fs:
        level = optimization_of(f)
        src = os.path.join(os.path.dirname(d), f.partition('.')[0] + '.py')
        if level is not None and os.path.exists(src):
            jobs.append(PycJob(os.path.join(d, f), src, level))
t = time.perf_counter()
verdicts = check_pycs(jobs)
bad = sum(v.status != 'match' for v in verdicts)
print(len(jobs), bad, time.perf_counter() - t)
"""


def warm_page_cache(root: Path) -> tuple[int, int]:
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
            files += 1
    return files, size


def measure(
    label: str, argv: list[str], repeat: int, env: dict[str, str] | None = None, note: str = ""
) -> dict[str, object]:
    runs: list[ChildResult] = []
    cpu: list[float] = []
    for _ in range(repeat):
        # CPU seconds of the command and everything it started (its pyc
        # workers too): steadier than wall time when other jobs share the cores.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = run_measured(argv, timeout=TIMEOUT, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        runs.append(result)
        if result.timed_out:
            break
    times = [r.seconds for r in runs]
    last = runs[-1]
    row: dict[str, object] = {
        "label": label,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": statistics.median(cpu),
        "runs": len(runs),
        "peak_rss": max(r.peak_rss_bytes for r in runs),
        "exit": last.returncode,
        "stdout_tail": last.stdout.strip().splitlines()[-1:] if last.stdout.strip() else [],
        "stderr_tail": last.stderr.strip().splitlines()[-1:] if last.stderr.strip() else [],
        "note": note,
    }
    print(
        f"  {label:<46} median {row['median_s']:7.2f} s  min {row['min_s']:7.2f} s  "
        f"cpu {row['cpu_s']:7.2f} s  rss {human_size(float(row['peak_rss'])):>9}  "
        f"exit {last.returncode}",
        file=sys.stderr,
    )
    return row


def settle(root: Path) -> None:
    """Wait until no file under ``root`` changed in the last minute: the cache remembers
    nothing about such files (the racy window), and "nothing changed" would measure misses."""
    newest = 0.0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_ctime)
            except OSError:
                pass
    wait = newest + 61 - time.time()
    if wait > 0:
        print(f"waiting {wait:.0f} s: files changed in the last minute", file=sys.stderr)
        time.sleep(wait)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--path",
        default=sysconfig.get_paths()["purelib"],
        help="site-packages to verify (default: this interpreter's)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per fast command")
    ap.add_argument(
        "--repeat-slow",
        type=int,
        default=1,
        help="runs of the cold pyc commands (tens of seconds each; 0 skips them)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    root = Path(args.path).resolve()
    trainguard = str(VENV_BIN / "trainguard")
    files, size = warm_page_cache(root)
    info = machine_info()
    load_before = os.getloadavg()
    print(
        f"{root}: {files:,} files, {human_size(size)}; {info}; load {load_before}", file=sys.stderr
    )
    cache_home = tempfile.mkdtemp(prefix="tg-env-bench-cache-")
    env = {**os.environ, "XDG_CACHE_HOME": cache_home}
    base = [
        trainguard,
        "env",
        "verify",
        "--path",
        str(root),
        "--no-progress",
        "-f",
        "json",
        "-o",
        os.devnull,
    ]
    rows = [
        measure(
            "floor: python sha256, all files, threads",
            [sys.executable, "-c", FLOOR_PY, str(root)],
            args.repeat,
        ),
    ]
    if shutil.which("sha256sum"):
        cmd = (
            f"find {str(root)!r} -type f -print0 | xargs -0 -P {os.cpu_count()} -n 256 "
            "sha256sum > /dev/null"
        )
        rows.append(
            measure("floor: coreutils sha256sum, all files", ["sh", "-c", cmd], args.repeat)
        )
    rows += [
        measure(
            "naive RECORD script (one thread, no other check)",
            [sys.executable, "-c", NAIVE_RECORD, str(root)],
            args.repeat,
        ),
        measure("env verify --no-pyc --no-cache", [*base, "--no-pyc", "--no-cache"], args.repeat),
    ]
    if args.repeat_slow:
        rows += [
            measure(
                "env verify --no-cache (cold: every pyc compiled)",
                [*base, "--no-cache"],
                args.repeat_slow,
            ),
            measure(
                "pyc check alone (library call)",
                [sys.executable, "-c", PYC_ONLY, str(root)],
                args.repeat_slow,
            ),
        ]
    settle(root)
    run_measured([*base, "--full"], timeout=TIMEOUT, env=env)  # fills the cache
    rows += [
        measure("env verify, cache warm, nothing changed", base, args.repeat, env=env),
        measure(
            "env verify --no-pyc, cache warm, nothing changed",
            [*base, "--no-pyc"],
            args.repeat,
            env=env,
        ),
        measure(
            "pip check (dependencies only, not files)",
            [sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
            args.repeat,
            note="not equivalent",
        ),
    ]
    # Last, since it leaves a file changed within the racy window (a minute): one file
    # touched before each run (its content stays), so the stored verdict cannot be
    # reused: the cost of a re-verify after a small change.
    touched = next(root.glob("*.dist-info/INSTALLER"), None)
    if touched is not None:
        command = " ".join(shlex.quote(a) for a in base)
        rows.append(
            measure(
                "env verify, cache warm, one file touched",
                ["sh", "-c", f"touch {shlex.quote(str(touched))} && exec {command}"],
                args.repeat,
                env=env,
            )
        )
    shutil.rmtree(cache_home, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"load average before {load_before}, after {load_after} (other processes share "
        "the cores: compare min and CPU times)",
        file=sys.stderr,
    )
    print("\n| command | median s | min s | CPU s | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['label']} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
            f"{row['cpu_s']:.2f} | {human_size(float(row['peak_rss']))} |"  # type: ignore[arg-type]
        )
    if args.json:
        doc = {
            "path": str(root),
            "files": files,
            "bytes": size,
            "machine": info,
            "load_before": load_before,
            "load_after": load_after,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
