"""Every sample that claims to fire really runs its payload under its loader.

Loading happens only in child processes.  Starting one interpreter per sample
would import torch ~60 times, so a single harness process imports the heavy
libraries once and forks a fresh child per sample; each child runs the
sample's ``LOADERS`` source exactly as ``python -c SRC FILE`` would.  A few
samples are also run the plain ``python -c`` way to keep the harness honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainguard.samples import (
    BENIGN,
    LOADER_REQUIRES,
    LOADERS,
    MALICIOUS,
    Sample,
    build_all,
    build_large_numpy_pickle,
    build_large_torch_checkpoint,
    missing_modules,
)

LOAD_TIMEOUT = 60
# Payloads that start a process without waiting (Popen, spawnv) may finish
# just after their loader exits.
CANARY_GRACE = 5.0
# fires=False samples whose loader we do not run at all: pip.main starts pip.
NOT_RUN = {"gadget-pip-main"}

_HARNESS = r"""
import json, os, signal, sys, traceback
for mod in ("torch", "numpy", "joblib"):
    try:
        __import__(mod)
    except ImportError:
        pass
results = {}
for job in json.load(sys.stdin):
    log = open(job["log"], "wb")
    pid = os.fork()
    if pid == 0:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        signal.alarm(job["timeout"])
        sys.argv = ["-c", job["file"]]
        code = 0
        try:
            exec(compile(job["src"], "<loader>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    log.close()
    _, status = os.waitpid(pid, 0)
    results[job["id"]] = os.waitstatus_to_exitcode(status)
json.dump(results, sys.stdout)
"""


@dataclass(frozen=True)
class Outcome:
    rc: int
    fired: bool
    canary_before: bool
    log: str


def _canary(root: Path, sample: Sample) -> Path:
    return root / "canaries" / sample.id


def _run_all(root: Path, samples: list[Sample]) -> dict[str, Outcome]:
    jobs: list[dict[str, str | int]] = []
    before: dict[str, bool] = {}
    for s in samples:
        folder = root / s.id
        folder.mkdir(parents=True)
        path = s.build(folder, _canary(root, s))
        before[s.id] = _canary(root, s).exists()
        jobs.append(
            {
                "id": s.id,
                "src": LOADERS[s.loader],
                "file": str(path),
                "log": str(root / f"{s.id}.log"),
                "timeout": LOAD_TIMEOUT,
            }
        )
    if hasattr(os, "fork"):
        proc = subprocess.run(
            [sys.executable, "-c", _HARNESS],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            timeout=LOAD_TIMEOUT * 4 + 2 * len(jobs),
        )
        assert proc.returncode == 0, proc.stderr
        codes: dict[str, int] = json.loads(proc.stdout)
    else:  # no fork (Windows): one interpreter per sample
        codes = {
            str(j["id"]): _run_direct(str(j["src"]), Path(str(j["file"])), Path(str(j["log"])))
            for j in jobs
        }
    return {
        s.id: Outcome(
            codes[s.id],
            _wait_for(_canary(root, s), s.fires),
            before[s.id],
            (root / f"{s.id}.log").read_text(errors="replace"),
        )
        for s in samples
    }


def _run_direct(src: str, file: Path, log: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", src, str(file)], capture_output=True, timeout=LOAD_TIMEOUT
    )
    log.write_bytes(proc.stdout + proc.stderr)
    return proc.returncode


def _wait_for(canary: Path, patient: bool) -> bool:
    deadline = time.monotonic() + (CANARY_GRACE if patient else 0.0)
    while not canary.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return canary.exists()


def _runnable(table: dict[str, Sample]) -> list[Sample]:
    return [s for s in table.values() if s.id not in NOT_RUN and not missing_modules(s)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("samples")
    (root / "canaries").mkdir()
    return _run_all(root, _runnable(MALICIOUS) + _runnable(BENIGN))


def _skip_if_missing(sample: Sample) -> None:
    for mod in (*sample.requires, *LOADER_REQUIRES[sample.loader]):
        pytest.importorskip(mod)


@pytest.mark.parametrize("sid", [s.id for s in MALICIOUS.values() if s.fires])
def test_payload_fires(sid: str, outcomes: dict[str, Outcome]) -> None:
    sample = MALICIOUS[sid]
    _skip_if_missing(sample)
    got = outcomes[sid]
    assert not got.canary_before, "building the sample must not run its payload"
    assert got.fired, f"{sid}: payload did not run under {sample.loader!r}\n{got.log}"


@pytest.mark.parametrize(
    "sid", [s.id for s in MALICIOUS.values() if not s.fires and s.id not in NOT_RUN]
)
def test_documented_as_not_firing(sid: str, outcomes: dict[str, Outcome]) -> None:
    """fires=False is a claim too: if the loader starts running it, update the sample."""
    _skip_if_missing(MALICIOUS[sid])
    assert not outcomes[sid].fired


@pytest.mark.parametrize("sid", list(BENIGN))
def test_benign_loads_cleanly(sid: str, outcomes: dict[str, Outcome]) -> None:
    _skip_if_missing(BENIGN[sid])
    got = outcomes[sid]
    assert got.rc == 0, f"{sid} failed to load:\n{got.log}"
    assert not got.fired


@pytest.mark.parametrize(
    "sid", ["pickle-p0-os-system", "torch-zip-bad-crc", "pickle-nullifai-broken"]
)
def test_plain_python_c_contract(sid: str, tmp_path: Path) -> None:
    """The documented way: ``python -c LOADERS[key] FILE`` in a fresh interpreter."""
    sample = MALICIOUS[sid]
    _skip_if_missing(sample)
    canary = tmp_path / "canary"
    path = sample.build(tmp_path, canary)
    assert not canary.exists()
    _run_direct(LOADERS[sample.loader], path, tmp_path / "log")
    assert _wait_for(canary, True)


def test_registry_is_consistent() -> None:
    assert len(MALICIOUS) >= 50 and len(BENIGN) >= 15
    for s in [*MALICIOUS.values(), *BENIGN.values()]:
        assert s.loader in LOADERS and s.loader in LOADER_REQUIRES, s.id
        assert s.malicious == (s.id in MALICIOUS)
        assert s.malicious or (not s.fires and s.expect in ("clean", "medium"))
        assert s.advisory == "" or s.advisory.startswith("https://"), s.id


def test_build_all_shares_one_canary_and_unique_names(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    built = build_all(tmp_path / "out", canary)
    assert built and all(p.is_file() for _, p in built)
    assert {s.id for s, _ in built} <= set(MALICIOUS) | set(BENIGN)
    assert all(
        p.parent == tmp_path / "out" / ("malicious" if s.malicious else "benign") / s.id
        for s, p in built
    )
    assert not canary.exists()
    # Distinct file names let callers (the demo) build many samples into one folder.
    names = [p.name for _, p in built]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError):
        build_all(tmp_path / "bad", canary, include=("nope",))


def test_large_builders(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    size = 3 * 1024 * 1024 + 12
    ckpt = build_large_torch_checkpoint(tmp_path / "big.pt", size)
    assert size <= ckpt.stat().st_size < size + 64 * 1024
    pkl = build_large_numpy_pickle(tmp_path / "big.pkl", size)
    assert size <= pkl.stat().st_size < size + 64 * 1024
    # weights_only never runs code, so this load may happen in-process.
    sd = torch.load(ckpt, weights_only=True)
    assert sum(t.numel() * 4 for t in sd.values()) == size - size % 4
    assert np.isfinite(next(iter(sd.values())).numpy()).all()
    assert _run_direct(LOADERS["pickle"], pkl, tmp_path / "log") == 0
