"""trainguard seal/verify against OpenSSF model-signing on the same model folder.

Builds a folder of random files (default 2 GiB: two of 512 MiB, four of
224 MiB and a few small ones, like a sharded checkpoint with its configs),
reads it once so that every tool finds it in the page cache (warm), then runs
each command ``--repeat`` times in a subprocess and reports the median wall
time and the peak RSS (``_runner.py``):

- ``model_signing sign key`` (its CLI: sha256, whole files) and ``verify key``;
- ``trainguard seal --full`` with sha256, with sha256 in 256 MiB shards and
  with blake3 (``--full``: no digest cache, every byte hashed);
- ``trainguard verify`` with the digest cache warm and nothing changed, then
  after one small file changed;
- the floor: ``b3sum`` when installed, otherwise BLAKE3's own multithreaded
  mmap hasher (the Rust ``blake3`` crate that b3sum uses, through the
  ``blake3`` Python package), and coreutils ``sha256sum``.

    /work/main/.venv/bin/python bench/seal_bench.py
    /work/main/.venv/bin/python bench/seal_bench.py --size 512M --repeat 5 --keep /tmp/m
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _runner import human_size, machine_info, parse_size, run_measured  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TIMEOUT = 900.0
# Times the library call alone, so that start-up (interpreter and imports) is
# seen apart from hashing; prints the seconds.
LIBRARY_SEAL = (
    "import sys, time, trainguard\n"
    "t = time.perf_counter()\n"
    "trainguard.seal(sys.argv[1], sys.argv[2], signature=sys.argv[3], hash=sys.argv[4],"
    " full=True)\n"
    "print(time.perf_counter() - t)\n"
)
B3_PROXY = (
    "import sys, blake3\n"
    "for p in sys.argv[1:]:\n"
    "    print(blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(p).hexdigest(), p)\n"
)


def build_folder(root: Path, total: int) -> list[Path]:
    """Random files adding up to ``total`` bytes (incompressible, like weights)."""
    root.mkdir(parents=True, exist_ok=True)
    big, mid = total // 4, total * 7 // 64
    sizes = [big, big, mid, mid, mid, mid]
    sizes.append(total - sum(sizes))  # the rest, so that the total is exact
    files = [root / f"model-{i:05d}-of-{len(sizes):05d}.safetensors" for i in range(len(sizes))]
    block = 8 << 20
    for path, size in zip(files, sizes, strict=True):
        with path.open("wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(block, left))
                fh.write(chunk)
                left -= len(chunk)
    for name, text in (("config.json", '{"hidden": 4096}'), ("tokenizer.json", "{}" * 1000)):
        (root / name).write_text(text)
        files.append(root / name)
    return files


def warm(files: list[Path]) -> None:
    for path in files:
        with path.open("rb") as fh:
            while fh.read(16 << 20):
                pass


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    r = run_measured(argv, timeout=TIMEOUT, env=env)
    if r.returncode != 0 or r.timed_out:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-2000:]}")
    if argv[1:2] == ["-c"] and argv[2] == LIBRARY_SEAL:  # the library's own timing
        return float(r.stdout.strip().splitlines()[-1]), r.peak_rss_bytes
    return r.seconds, r.peak_rss_bytes


def run_rounds(
    rows: list[tuple[str, list[str]]], repeat: int, env: dict[str, str]
) -> dict[str, tuple[list[float], int]]:
    """Every command once per round: a load that comes and goes hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    peaks: dict[str, int] = dict.fromkeys(times, 0)
    for _ in range(repeat):
        for name, argv in rows:
            seconds, rss = run_once(argv, env)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], rss)
    return {name: (times[name], peaks[name]) for name in times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="total folder size (default 2G)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="build (or reuse) the folder here")
    ap.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        default=[],
        help="run only the commands whose name contains TEXT (repeatable); "
        "model_signing sign always runs, as the reference",
    )
    args = ap.parse_args()
    total = parse_size(args.size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tg-seal-bench-"))
    model = work / "model"
    try:
        files = sorted(p for p in model.glob("*") if p.is_file()) if model.is_dir() else []
        if sum(p.stat().st_size for p in files) != total:
            shutil.rmtree(model, ignore_errors=True)
            started = time.perf_counter()
            files = build_folder(model, total)
            print(
                f"built {model} ({human_size(total)}) in {time.perf_counter() - started:.1f}s",
                file=sys.stderr,
            )
        warm(files)
        # The digest cache keeps nothing about a file changed in the last minute
        # (filestate.RACY_NS): a folder built just now would make the "cache warm" rows
        # measure hashing.
        age = time.time() - max(p.stat().st_ctime for p in files)
        if age < 61:
            print(f"waiting {61 - age:.0f} s for the files to settle", file=sys.stderr)
            time.sleep(61 - age)
        return run_all(work, model, files, args.repeat, args.only)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_all(work: Path, model: Path, files: list[Path], repeat: int, only: list[str]) -> int:
    sys.path.insert(0, str(REPO / "src"))
    from trainguard.signing.keys import write_keypair

    for stale in work.glob("key.*"):
        stale.unlink()
    private, public = write_keypair(work / "key")
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
    shutil.rmtree(work / "cache", ignore_errors=True)
    tg = str(VENV_BIN / "trainguard")
    ms = str(VENV_BIN / "model_signing")

    def sig(name: str) -> str:
        return str(work / name)

    b3sum = shutil.which("b3sum")
    floor_b3 = [b3sum] if b3sum else [sys.executable, "-c", B3_PROXY]
    floor_b3 += map(str, files)
    key, pub = str(private), str(public)

    def seal(out: str, *extra: str) -> list[str]:
        return [
            tg,
            "seal",
            str(model),
            "--key",
            key,
            "--signature",
            sig(out),
            "--no-progress",
            *extra,
        ]

    def library(hash_name: str) -> list[str]:
        return [sys.executable, "-c", LIBRARY_SEAL, str(model), key, sig("lib.sig"), hash_name]

    ms_sign = [ms, "sign", "key", str(model), "--private_key", key, "--signature", sig("ms.sig")]
    ms_verify = [ms, "verify", "key", str(model), "--public_key", pub, "--signature", sig("ms.sig")]
    tg_verify = [
        tg,
        "verify",
        str(model),
        "--key",
        pub,
        "--signature",
        sig("tg.sig"),
        "--no-progress",
    ]
    rows: list[tuple[str, list[str]]] = [
        ("model_signing sign key (sha256)", ms_sign),
        ("trainguard seal --full (sha256)", seal("tg.sig", "--full")),
        (
            "trainguard seal --full --shard-size 256M (sha256)",
            seal("tg-sh.sig", "--full", "--shard-size", "256M"),
        ),
        ("trainguard seal --full --hash blake3", seal("tg-b3.sig", "--full", "--hash", "blake3")),
        ("trainguard.seal() call only, sha256 (no start-up)", library("sha256")),
        ("trainguard.seal() call only, blake3 (no start-up)", library("blake3")),
        ("trainguard --version (start-up only)", [tg, "--version"]),
        ("b3sum" if b3sum else "blake3 mmap, all cores (b3sum's hasher)", floor_b3),
        ("sha256sum (coreutils, one core)", ["sha256sum", *map(str, files)]),
        ("model_signing verify key (sha256)", ms_verify),
        ("trainguard verify, digest cache warm, nothing changed", tg_verify),
    ]
    if only:
        rows = [r for r in rows if r is rows[0] or any(o in r[0] for o in only)]
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, {info['os']}, "
        f"Python {info['python']}; folder {human_size(sum(p.stat().st_size for p in files))} "
        f"in {len(files)} files, warm page cache; {repeat} rounds"
    )
    results = run_rounds(rows, repeat, env)
    # One small file changed: re-sealing hashes only that one again.
    name = "trainguard seal, digest cache warm, one small file changed"
    if not only or any(o in name for o in only):
        (model / "config.json").write_text('{"hidden": 8192}')
        results |= run_rounds([(name, seal("tg.sig"))], repeat, env)
    base = statistics.median(results["model_signing sign key (sha256)"][0])
    head = f"{'command':58} {'median s':>9} {'best s':>7} {'model_signing sign / this':>26}"
    print(f"\n{head} {'peak RSS':>10}")
    for name, (times, rss) in results.items():
        median = statistics.median(times)
        print(
            f"{name:58} {median:9.2f} {min(times):7.2f} {base / median:25.2f}x "
            f"{human_size(rss):>10}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
