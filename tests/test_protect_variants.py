"""Generative: random attack compositions fire under the real loaders, never under protect().

A fresh seed each run (printed; ``TG_VARIANT_SEED=N`` replays one).  Each
variant is first proven to fire (its canary folder gets a file) with the
victim's loading code in a forked child of a subprocess; then, in another,
the same code after ``protect()`` in block and in warn mode must leave the
canary folder empty and refuse the load.  bench/protect_variants.py runs
thousands.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.protect_variants import Variant, random_variants

pytest.importorskip("torch")
pytest.importorskip("joblib")

CI_SLICE = 12

_RUNNER = textwrap.dedent(
    """
    import json, os, sys
    import torch, numpy, joblib
    import trainguard
    mode = sys.argv[1]
    out = []
    for path, code, canary in json.loads(sys.argv[2]):
        pid = os.fork()
        if pid == 0:
            if mode != "real":
                trainguard.protect(mode=mode)
            status = "loaded"
            try:
                exec(code, {"path": path})
            except trainguard.UnsafeModelError:
                status = "refused"
            except BaseException as exc:
                status = "error " + repr(exc)[:160]
            os.write(1, (json.dumps([path, status]) + "\\n").encode())
            os._exit(0)
        os.waitpid(pid, 0)
    """
)


def run_variants(variants: list[Variant], folder: Path, mode: str) -> dict[str, tuple[str, bool]]:
    """name -> (how the load ended, whether the payload fired), all under ``mode``."""
    jobs, by_path = [], {}
    for v in variants:
        where = folder / mode / v.name
        canary = where / "canary"
        canary.mkdir(parents=True)
        path = v.build(where, canary)
        jobs.append((str(path), v.loader, str(canary)))
        by_path[str(path)] = (v.name, canary)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, mode, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            path, status = json.loads(line)
            name, canary = by_path[path]
            results[name] = (status, any(canary.iterdir()))
    assert len(results) == len(variants), proc.stderr[-2000:]
    return results


def test_random_variants_fire_unprotected_and_never_under_protect(tmp_path: Path) -> None:
    seed = int(os.environ.get("TG_VARIANT_SEED") or random.randrange(2**32))
    print(f"TG_VARIANT_SEED={seed}")
    variants = random_variants(random.Random(seed), CI_SLICE)
    real = run_variants(variants, tmp_path, "real")
    not_firing = {n: r for n, r in real.items() if not r[1]}
    assert not_firing == {}, f"seed {seed}: these do not fire under the real loader"
    for mode in ("block", "warn"):
        guarded = run_variants(variants, tmp_path, mode)
        fired = {n: r for n, r in guarded.items() if r[1]}
        assert fired == {}, f"seed {seed}: payload ran under protect(mode={mode!r})"
        loaded = {n: r for n, r in guarded.items() if r[0] != "refused"}
        assert loaded == {}, f"seed {seed}: not refused under protect(mode={mode!r})"
