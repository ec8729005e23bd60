"""A throwaway venv with a package pip installed into it, and a proof that
verifying a booby-trapped environment runs none of its code.

The verify runs in a child process under an audit hook: nothing planted in the
environment (a .pth, sitecustomize, a tampered module, a swapped pyc) may be
executed or imported, and the canary file they would create must not appear.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.test_env_support import FLIPPED_SOURCE, NAME, build_wheel, write_swapped_pyc

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python3*/site-packages")) or sorted(env.glob("Lib/site-packages"))
    assert found, f"no site-packages in {env}"
    return found[0]


@pytest.fixture(scope="module")
def real_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("venv")
    env = base / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    wheel = build_wheel(base)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return env


def _verify(site: Path, *extra: str) -> tuple[int, dict[str, object]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "env",
            "verify",
            "--path",
            str(site),
            "-f",
            "json",
            "--no-cache",
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return out.returncode, json.loads(out.stdout)


def _rules(doc: dict[str, object]) -> set[str]:
    files = doc["files"]
    assert isinstance(files, list)
    return {f["rule"] for r in files for f in r["findings"]}


def test_fresh_venv_verifies_clean_then_each_tamper_is_reported(real_venv: Path) -> None:
    site = _site_packages(real_venv)
    code, doc = _verify(site)
    assert code == 0
    assert _rules(doc) == {"TG606"}
    dist_rows = [r for r in doc["files"] if r["format"].startswith("distribution")]  # type: ignore[attr-defined,index]
    assert [r["format"] for r in dist_rows] == [f"distribution {NAME} 1.0"]

    optim = site / NAME / "optim.py"
    original = optim.read_text()
    optim.write_text(FLIPPED_SOURCE)
    assert "TG601" in _rules(_verify(site)[1])
    optim.write_text(original)


CANARY_CODE = "open({canary!r}, 'w').write('ran')"

HOOKED_VERIFY = """
import sys
site, root = sys.argv[1], sys.argv[2]
seen = []
def hook(event, args):
    if event == "exec" and getattr(args[0], "co_filename", "").startswith(site):
        seen.append(("exec", args[0].co_filename))
    if event == "import" and args[0].split(".")[0] in {planted}:
        seen.append(("import", args[0]))
    if event == "open" and isinstance(args[0], str) and args[0].endswith("canary") and (
            args[1] not in (None, "r", "rb")):
        seen.append(("open", args[0]))
sys.addaudithook(hook)
from trainguard.cli.main import main
code = main(["env", "verify", "--path", site, "--no-cache", "--no-progress", "--workers", "1",
             "-f", "json", "-o", root + "/report.json"])
print(repr(seen))
sys.exit(code)
"""


def test_verify_runs_nothing_it_finds(tmp_path: Path, real_venv: Path) -> None:
    site = _site_packages(real_venv)
    canary = tmp_path / "canary"
    payload = CANARY_CODE.format(canary=str(canary))
    (site / "zz-evil.pth").write_text(f"import os; {payload}\n")
    (site / "sitecustomize.py").write_text(f"{payload}\n")
    (site / "evilmod.py").write_text(f"{payload}\n")
    # mimetypes tries winreg when present: the verify reads the stdlib and the installed
    # sources to find that out, and must import neither the plant nor what it reads.
    (site / "winreg.py").write_text(f"{payload}\n")
    optim = site / NAME / "optim.py"
    original = optim.read_text()
    write_swapped_pyc(optim, f"{payload}\n" + FLIPPED_SOURCE)
    try:
        # Not winreg: trainguard's own imports may try it (mimetypes); the canary says
        # whether the plant ran.
        planted = {"evilmod", "sitecustomize", NAME}
        out = subprocess.run(
            [sys.executable, "-c", HOOKED_VERIFY.format(planted=planted), str(site), str(tmp_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 1, out.stderr
        assert out.stdout.strip() == "[]", out.stdout
        assert not canary.exists()
        report = json.loads((tmp_path / "report.json").read_text())
        assert {"TG605", "TG608", "TG603", "TG610", "TG604"} <= _rules(report)
    finally:
        for name in ("zz-evil.pth", "sitecustomize.py", "evilmod.py", "winreg.py"):
            (site / name).unlink()
        optim.write_text(original)
        (site / NAME / "__pycache__" / f"optim.{sys.implementation.cache_tag}.pyc").unlink()
