"""Red team 5 (red_env2 A2, A3, A6): the venv's own start-up files, outside its site folder.

A real venv is made here (``python -m venv --without-pip``, a random prompt) and verified
once, so its verdict is cached; then one drawn sabotage is planted and proven to run in
a child process (its payload appends to a canary), and the next verify must name it
(TG629 high) and not answer from the cached verdict:

* A2: ``pyvenv.cfg``'s ``home`` moved to a prefix inside the venv whose standard library
  links to the real one but for one planted module;
* A3: ``bin/python3`` replaced by a wrapper script that runs code, then the interpreter;
* A6: ``bin/activate`` with one line more.

Honest twins: the fresh venv (any prompt) is clean and its verdict is reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.seeds import seeded
from tests.test_env_snapshot import snapshot, verify_against
from trainguard import filestate
from trainguard.digest_cache import DigestCache
from trainguard.env.verify import EnvOptions, EnvResult, verify_environment
from trainguard.findings import Severity
from trainguard.signing.keys import generate_keypair

VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"
pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX venv layout")


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The venv is made a moment before it is verified (see test_env_verify)."""
    monkeypatch.setattr(filestate, "RACY_NS", 0)


def _venv(tmp: Path, prompt: str) -> Path:
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run(
        [base, "-m", "venv", "--without-pip", "--prompt", prompt, str(venv)],
        check=True,
        capture_output=True,
    )
    return venv


def _verify(venv: Path, cache: str) -> EnvResult:
    site = venv / "lib" / VERSION / "site-packages"
    return verify_environment(
        EnvOptions(paths=[str(site)], check_pyc=False, cache=DigestCache(cache))
    )


def _plant_home(venv: Path, canary: Path) -> list[str]:
    real = Path(sysconfig.get_paths()["stdlib"])
    prefix = venv / "share" / "tgpy"
    (prefix / "bin").mkdir(parents=True)
    lib = prefix / "lib" / VERSION
    lib.mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "colorsys.py":
            os.symlink(entry, lib / entry.name)
    (lib / "colorsys.py").write_text(
        (real / "colorsys.py").read_text() + f"\nopen({str(canary)!r}, 'a').write('fired\\n')\n"
    )
    cfg = venv / "pyvenv.cfg"
    lines = [
        f"home = {prefix / 'bin'}" if line.startswith("home") else line
        for line in cfg.read_text().splitlines()
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return [str(venv / "bin" / "python"), "-c", "import colorsys"]


def _plant_wrapper(venv: Path, canary: Path) -> list[str]:
    python = venv / "bin" / "python3"
    real = os.path.realpath(python)
    python.unlink()
    python.write_text(f'#!/bin/sh\necho fired >> "{canary}"\nexec "{real}" "$@"\n')
    python.chmod(0o755)
    return [str(python), "-c", "pass"]


def _plant_activate(venv: Path, canary: Path) -> list[str]:
    activate = venv / "bin" / "activate"
    activate.write_text(activate.read_text() + f'echo fired >> "{canary}"\n')
    return ["sh", "-c", f'. "{activate}"']


PLANTS = {"A2 home": _plant_home, "A3 wrapper": _plant_wrapper, "A6 activate": _plant_activate}


@pytest.mark.parametrize("attack", sorted(PLANTS))
def test_venv_start_up_files(tmp_path: Path, attack: str) -> None:
    rng = seeded()
    prompt = rng.choice(["tg", "my env", f"proj-{rng.randrange(1000)}", "(x) y.z"])
    venv = _venv(tmp_path, prompt)
    cache = str(tmp_path / "cache" / "env.json")
    first = _verify(venv, cache)
    assert not [f for f in first.report.findings if f.rule == "TG629"], first.report.findings
    again = _verify(venv, cache)
    assert again.stats.reused_from is not None, "an unchanged venv reuses its verdict"
    canary = tmp_path / "canary"
    command = PLANTS[attack](venv, canary)
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    assert "fired" in canary.read_text(), "the plant runs"
    after = _verify(venv, cache)
    assert after.stats.reused_from is None, "a stale verdict answered"
    high = [f for f in after.report.findings if f.rule == "TG629" and f.severity >= Severity.HIGH]
    assert high, after.report.findings
    assert after.report.exit_code() == 1


def test_system_site_packages_is_reported(tmp_path: Path) -> None:
    venv = _venv(tmp_path, "tg")
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace("= false", "= true"))
    found = [
        f for f in _verify(venv, str(tmp_path / "c.json")).report.findings if f.rule == "TG629"
    ]
    assert [f.severity for f in found] == [Severity.MEDIUM]


@pytest.mark.parametrize("attack", sorted(PLANTS))
def test_snapshot_covers_venv_files(
    tmp_path: Path, attack: str, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate_keypair("ecdsa-p256")
    (tmp_path / "key.pem").write_bytes(private)
    (tmp_path / "key.pub").write_bytes(public)
    venv = _venv(tmp_path, "tg")
    site = venv / "lib" / VERSION / "site-packages"
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, tmp_path / "key.pem", snap) == 0
    capsys.readouterr()
    PLANTS[attack](venv, tmp_path / "canary")
    code, rules = verify_against(site, snap, tmp_path / "key.pub", capsys)
    assert code == 1
    changed = {os.path.basename(p) for p in rules.get("TG615", [])}
    assert changed & {"pyvenv.cfg", "python3", "activate"}, rules
