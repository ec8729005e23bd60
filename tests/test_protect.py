"""protect(): every malicious sample is refused through the real loaders.

Each check runs in a fresh subprocess with the victim's own loading code
(``trainguard.samples.LOADERS``) after ``trainguard.protect()``; the canary a
payload would create must never appear.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainguard.samples import BENIGN, LOADERS, MALICIOUS, Sample, missing_modules

pytest.importorskip("torch")

# One interpreter runs every sample: each in a child forked after the heavy
# imports, so one sample's effects never leak into the next.
_RUNNER = textwrap.dedent(
    """
    import json, os, sys
    import torch, numpy, joblib
    import trainguard
    from trainguard.samples import LOADERS
    jobs = json.loads(sys.argv[1])
    out = {}
    for path, loader in jobs:
        pid = os.fork()
        if pid == 0:
            trainguard.protect(mode=os.environ.get("TG_MODE", "block"))
            sys.argv = ["loader", path]
            try:
                exec(compile(LOADERS[loader], "<loader>", "exec"), {"__name__": "__main__"})
            except trainguard.UnsafeModelError as exc:
                rules = sorted({f.rule for f in exc.findings})
                os.write(1, (json.dumps([path, "refused", rules]) + "\\n").encode())
                os._exit(3)
            except BaseException as exc:
                os.write(1, (json.dumps([path, "error", repr(exc)[:200]]) + "\\n").encode())
                os._exit(4)
            os.write(1, (json.dumps([path, "loaded", []]) + "\\n").encode())
            os._exit(0)
        os.waitpid(pid, 0)
    """
)


def _run(jobs: list[tuple[str, str]], mode: str = "block") -> dict[str, tuple[str, list[str]]]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "TG_MODE": mode},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            path, status, detail = json.loads(line)
            results[path] = (status, detail)
    return results


# The loaders protect() patches: torch.load, pickle.load(s), numpy.load, joblib.load,
# directly or after unpacking an archive. GGUF templates, Keras, ONNX and
# safetensors have loaders of their own that protect() does not cover (yet).
PROTECTED_LOADERS = frozenset(
    "pickle pickle-stream torch torch-weights-only torch-pickle-file torch-check-weights "
    "numpy numpy-npz joblib gzip-pickle bz2-pickle lzma-pickle tar-torch zip-torch "
    "7z-pickle".split()
)


def _build(table: dict[str, Sample], tmp_path: Path, canary: Path) -> dict[str, str]:
    built = {}
    for sid, sample in table.items():
        if missing_modules(sample) or sample.loader not in PROTECTED_LOADERS:
            continue
        folder = tmp_path / sid
        folder.mkdir()
        built[str(sample.build(folder, canary))] = sid
    return built


@pytest.mark.parametrize("mode", ["block", "warn"])
def test_protect_refuses_every_malicious_sample(tmp_path: Path, mode: str) -> None:
    canary = tmp_path / "canary"
    built = _build(MALICIOUS, tmp_path, canary)
    jobs = [(p, MALICIOUS[sid].loader) for p, sid in built.items()]
    results = _run(jobs, mode)
    assert len(results) == len(jobs)
    loaded = {built[p]: r for p, r in results.items() if r[0] == "loaded"}
    assert loaded == {}
    assert not canary.exists()
    if mode == "block":
        not_refused = {built[p]: r for p, r in results.items() if r[0] != "refused"}
        assert not_refused == {}
    if mode == "warn":
        # warn lets the scan's findings through: the sandbox has to stop the payload.
        sandbox_caught = [p for p, r in results.items() if "TG403" in r[1]]
        assert sandbox_caught, results


def test_benign_samples_load_under_protect(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    built = _build(BENIGN, tmp_path, canary)
    jobs = [(p, BENIGN[sid].loader) for p, sid in built.items()]
    results = _run(jobs)
    failed = {built[p]: r for p, r in results.items() if r[0] != "loaded"}
    assert failed == {}
    assert len(results) == len(jobs)


def test_loaders_cover_what_samples_use() -> None:
    used = {s.loader for s in [*MALICIOUS.values(), *BENIGN.values()]}
    assert used <= set(LOADERS)


_COMPARE = textwrap.dedent(
    """
    import sys
    import numpy as np, torch, joblib
    import trainguard
    from tests.test_load_safe import same
    LOAD = {"torch": lambda p: torch.load(p, weights_only=False),
            "numpy": lambda p: np.load(p, allow_pickle=True),
            "joblib": joblib.load}
    paths = sys.argv[1:]
    plain = [LOAD[k](p) for k, p in zip(paths[::2], paths[1::2])]
    trainguard.protect()
    guarded = [LOAD[k](p) for k, p in zip(paths[::2], paths[1::2])]
    bad = [p for p, a, b in zip(paths[1::2], plain, guarded) if not same(a, b)]
    print("MISMATCH", bad)
    """
)


def test_benign_loads_are_bit_for_bit_equal_under_protect(tmp_path: Path) -> None:
    argv: list[str] = []
    for sid, sample in BENIGN.items():
        if missing_modules(sample) or sample.loader not in ("torch", "numpy", "joblib"):
            continue
        if sample.expect != "clean":
            continue
        folder = tmp_path / sid
        folder.mkdir()
        argv += [sample.loader, str(sample.build(folder, tmp_path / "canary"))]
    assert len(argv) >= 10
    proc = subprocess.run(
        [sys.executable, "-c", _COMPARE, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MISMATCH []" in proc.stdout
