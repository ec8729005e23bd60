"""Does trainguard's scan cost track pickle bytes or file bytes?

Builds benign PyTorch zip checkpoints of the given sizes (default 2 MiB and
2 GiB) with ``trainguard.samples.build_large_torch_checkpoint``, scans each with
``python -m trainguard scan`` in a subprocess and reports wall time and peak RSS
beside the size of the pickle inside (``data.pkl``) and of the tensor bytes.
If the scanner reads only the pickle and the zip directory, the 2 GiB file costs
about what the 2 MiB one does; if it reads tensor data, time grows with the file.

    /work/main/.venv/bin/python bench/scan_scaling.py
    /work/main/.venv/bin/python bench/scan_scaling.py --sizes 2M,200M,2G --repeat 3

The start-up row times ``python -m trainguard scan --help``: the fixed cost of
starting the interpreter and importing the CLI, paid by every scan.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _runner import ChildResult, human_size, machine_info, parse_size, run_measured  # noqa: E402

if importlib.util.find_spec("trainguard") is None:
    sys.path.insert(0, str(REPO / "src"))


@dataclass
class Row:
    label: str
    file_bytes: int
    pickle_bytes: int
    seconds: float
    peak_rss_bytes: int
    exit_code: int
    verdict: str


def pickle_bytes(path: Path) -> int:
    # The benchmark built this file itself, so reading its zip directory with the
    # standard library is fine here (the scanner under test never does this).
    with zipfile.ZipFile(path) as zf:
        return sum(i.file_size for i in zf.infolist() if i.filename.endswith(".pkl"))


def best_of(argv: list[str], env: dict[str, str], repeat: int, timeout: float) -> ChildResult:
    runs = [run_measured(argv, timeout=timeout, env=env) for _ in range(repeat)]
    return min(runs, key=lambda r: r.seconds)


def verdict_of(child: ChildResult) -> str:
    try:
        doc = json.loads(child.stdout)
    except ValueError:
        return "?"
    return str(doc.get("verdict") or "clean") if isinstance(doc, dict) else "?"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="2M,2G", help="comma-separated checkpoint sizes")
    ap.add_argument("--repeat", type=int, default=1, help="scans per file (fastest counts)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per scan")
    ap.add_argument("--python", default=sys.executable, help="interpreter with trainguard")
    ap.add_argument("--dir", type=Path, default=None, help="build here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write raw results here")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    repeat = max(1, args.repeat)

    from trainguard.samples import build_large_torch_checkpoint

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compile once, as an installed package would
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    root = args.dir or Path(tempfile.mkdtemp(prefix="tg-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        cli = [args.python, "-m", "trainguard", "scan"]
        start = best_of([*cli, "--help"], env, repeat, args.timeout)
        rows.append(
            Row(
                "start-up (scan --help)",
                0,
                0,
                start.seconds,
                start.peak_rss_bytes,
                start.returncode,
                "-",
            )
        )
        for size in sizes:
            path = root / f"ckpt-{size}.pt"
            print(f"building {human_size(size)} checkpoint ...", file=sys.stderr)
            built = Path(build_large_torch_checkpoint(path, size) or path)
            child = best_of(
                [*cli, "--format", "json", "--no-progress", str(built)], env, repeat, args.timeout
            )
            rows.append(
                Row(
                    label=human_size(built.stat().st_size),
                    file_bytes=built.stat().st_size,
                    pickle_bytes=pickle_bytes(built),
                    seconds=child.seconds,
                    peak_rss_bytes=child.peak_rss_bytes,
                    exit_code=child.returncode,
                    verdict="timeout" if child.timed_out else verdict_of(child),
                )
            )
            built.unlink()  # a 2 GiB file need not outlive its measurement
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()))
    print(f"best of {repeat} run(s) each; one process per scan\n")
    hdr = f"{'checkpoint':<24} {'pickle bytes':>13} {'tensor bytes':>13} {'scan s':>8} "
    hdr += f"{'peak RSS':>10} {'exit':>5} {'verdict':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tensor = human_size(r.file_bytes - r.pickle_bytes) if r.file_bytes else "-"
        pkl = f"{r.pickle_bytes:,}" if r.file_bytes else "-"
        print(
            f"{r.label:<24} {pkl:>13} {tensor:>13} {r.seconds:>8.2f} "
            f"{human_size(r.peak_rss_bytes):>10} {r.exit_code:>5} {r.verdict:>8}"
        )
    scans = rows[1:]
    if len(scans) >= 2:
        small, big = scans[0], scans[-1]
        print(
            f"\nfile size x{big.file_bytes / small.file_bytes:,.0f}, "
            f"pickle bytes x{big.pickle_bytes / max(1, small.pickle_bytes):.2f}, "
            f"scan time x{big.seconds / small.seconds:.2f}, "
            f"peak RSS x{big.peak_rss_bytes / max(1, small.peak_rss_bytes):.2f}"
        )
    if args.json:
        doc = {"machine": machine_info(), "repeat": repeat, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
