"""What the environment checks of issue 12 cost on a real environment (torch included).

- ``--wheelhouse``: every distribution with a wheel in the wheelhouse compared
  member by member (default wheelhouse: /opt/wheels, where this machine keeps
  the torch wheel the test venv was installed from), through the library, with
  the installed files' digests computed afresh (no cache);
- the search for who imports a planted module: for a few names, how long the
  installed sources (and the standard library's) take to sieve and parse.
  Nothing is planted: the search is run for the names directly.

    /work/main/.venv/bin/python bench/env_reference_bench.py
    /work/main/.venv/bin/python bench/env_reference_bench.py --wheelhouse DIR --path SITE

Run it on an otherwise idle machine; it reads the whole environment once first
(page cache warm), then reports the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import TypeVar

from trainguard.env.digests import hash_file
from trainguard.env.imports import find_importers, stdlib_sources
from trainguard.env.record import distributions
from trainguard.env.reference import reference_findings
from trainguard.env.wheels import canonical_name, load_reference
from trainguard.filestate import default_workers

T = TypeVar("T")
NAMES = ("apex", "flash_attn", "tgx_nobody_imports_this", "torch._planted", "utils")


def _sha256(path: str) -> bytes | str:
    try:
        return hash_file(path, frozenset({"sha256"})).values["sha256"]
    except OSError as exc:
        return str(exc)


def _median(runs: int, work: Callable[[], T]) -> tuple[float, T]:
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=sysconfig.get_paths()["purelib"])
    parser.add_argument("--wheelhouse", default="/opt/wheels")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dists = distributions(args.path)
    for dist in dists:  # the page cache warm
        for entry in dist.entries:
            _sha256(entry.path)
    if os.path.isdir(args.wheelhouse):
        ref = load_reference([args.wheelhouse], None)
        covered = [d for d in dists if any(n == canonical_name(d.name) for n, _ in ref.wheels)]
        seconds, found = _median(
            args.repeat,
            lambda: reference_findings(covered, ref, _sha256, default_workers()),
        )
        files = sum(len(d.entries) for d in covered)
        print(
            f"wheelhouse: {len(covered)} distribution(s), {files:,} RECORD rows compared "
            f"with their wheels in {seconds:.1f} s; {len(found)} finding(s)"
        )
    sources = [(e.path, args.path) for d in dists for e in d.entries if e.path.endswith(".py")]
    sources += stdlib_sources([sysconfig.get_paths()["stdlib"]])
    for name in NAMES:
        took, importers = _median(args.repeat, functools.partial(find_importers, {name}, sources))
        where = next(iter(importers.values())).file if importers else "nobody"
        print(f"who imports {name!r} ({len(sources):,} sources): {took:.2f} s -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
