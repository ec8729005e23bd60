"""Generated cases for three classes of ``env verify`` evasions (red team, 2026-12-05).

1. Import roots that ``.pth`` path lines add (relative or absolute, inside or outside the
   site folder, a folder or a zip archive under any name): a module there runs under its
   own name, so it is judged from that root (E1, E2, E7, E11, E12, E14).
2. Console-script launchers: regenerated from the entry point and compared byte for
   byte, with or without a RECORD row for them (E4a, E4b).
3. What only the site folder's own metadata vouches for: start-up hooks with a RECORD
   row, a distribution without RECORD, an autoloaded entry-point group (E3, E10).

Each case builds a small throwaway venv (``python -m venv --without-pip``) holding one
hand-written distribution, plants one random member of the family whose payload only
writes a canary, proves it fires under the venv's real interpreter in a subprocess,
then verifies: high, naming the planted file.  An honest twin of each family verifies
clean.  The seed is printed (``TRAINGUARD_TEST_SEED`` replays it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.seeds import seeded
from tests.test_env_support import record_hash
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.findings import Finding, Severity

PIP_BODY = (
    "import sys\nfrom {module} import {name}\nif __name__ == '__main__':\n"
    "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit({name}())\n"
)


@dataclass
class Venv:
    prefix: Path
    site: Path
    python: Path
    dist: str  # the consumer's import name
    optional: str  # the optional dependency it imports when present
    canary: Path

    def payload(self) -> str:
        return f"import pathlib; pathlib.Path({str(self.canary)!r}).write_text('fired')\n"

    def fires(self, code: str = "pass", argv: list[str] | None = None) -> bool:
        self.canary.unlink(missing_ok=True)
        subprocess.run(
            argv or [str(self.python), "-c", code],
            capture_output=True,
            cwd=self.prefix,
            timeout=60,
            check=False,
        )
        return self.canary.exists()

    def record(self, meta: str, files: dict[str, bytes]) -> None:
        """Write files and a RECORD for them (paths relative to the site folder)."""
        rows = []
        for rel, data in files.items():
            path = self.site / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows.append(f"{rel},{record_hash(data)},{len(data)}\n")
        (self.site / meta / "RECORD").write_text("".join(rows) + f"{meta}/RECORD,,\n")

    def add_row(self, meta: str, rel: str) -> None:
        data = (self.site / rel).read_bytes()
        with open(self.site / meta / "RECORD", "a") as fh:
            fh.write(f"{rel},{record_hash(data)},{len(data)}\n")


@pytest.fixture()
def venv() -> Iterator[Venv]:
    rng = seeded()
    # A short prefix: a launcher's shebang must stay under the kernel's length limit.
    base = Path(tempfile.mkdtemp(prefix="tgv"))
    try:
        prefix = base / "v"
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(prefix)],
            check=True,
            capture_output=True,
        )
        tag = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        site = prefix / "lib" / tag / "site-packages"
        name = f"tgc_{rng.randrange(16**5):05x}"
        optional = f"tgopt_{rng.randrange(16**5):05x}"
        env = Venv(prefix, site, prefix / "bin" / "python", name, optional, base / "canary")
        meta = f"{name}-1.0.dist-info"
        init = f"try:\n    import {optional}\nexcept ImportError:\n    {optional} = None\n"
        env.record(
            meta,
            {
                f"{name}/__init__.py": init.encode(),
                f"{name}/cli.py": b"def main():\n    return 0\n",
                f"{meta}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
                f"{meta}/entry_points.txt": (
                    f"[console_scripts]\n{name} = {name}.cli:main\n".encode()
                ),
            },
        )
        launcher = prefix / "bin" / name
        launcher.write_text(
            f"#!{env.python}\n" + PIP_BODY.format(module=f"{name}.cli", name="main")
        )
        launcher.chmod(0o755)
        env.add_row(meta, os.path.relpath(launcher, site))
        yield env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def verify(env: Venv) -> list[Finding]:
    report = verify_environment(EnvOptions(paths=[str(env.site)], check_pyc=False)).report
    return [f for f in report.findings if f.severity >= Severity.HIGH]


def test_honest_twins_verify_clean(venv: Venv) -> None:
    rng = seeded()
    # A .pth folder inside the site holding a module nobody imports, or an honest
    # editable install (its own package in its source folder); the launcher as pip
    # wrote it, with or without its RECORD row.
    if rng.random() < 0.5:
        folder = venv.site / "_extras"
        folder.mkdir()
        (folder / f"{venv.dist}_helpers_x.py").write_text("VALUE = 1\n")
        (venv.site / "zz_extras.pth").write_text("_extras\n")
    else:
        src = venv.prefix.parent / "src"
        (src / "tgown").mkdir(parents=True)
        (src / "tgown" / "__init__.py").write_text("VALUE = 1\n")
        meta = "tgown-0.1.dist-info"
        venv.record(
            meta,
            {
                "__editable__.tgown-0.1.pth": f"{src}\n".encode(),
                f"{meta}/METADATA": b"Metadata-Version: 2.1\nName: tgown\nVersion: 0.1\n",
                f"{meta}/direct_url.json": json.dumps(
                    {"url": f"file://{src}", "dir_info": {"editable": True}}
                ).encode(),
            },
        )
    if rng.random() < 0.5:
        record = venv.site / f"{venv.dist}-1.0.dist-info" / "RECORD"
        record.write_text("".join(r for r in record.read_text().splitlines(True) if "bin" not in r))
    high = verify(venv)
    assert not high, high


def _plant_on_path(env: Venv, rng_seed: int) -> tuple[Path, str]:
    """A random member of family 1; returns (the file whose finding names it, trigger)."""
    import random

    rng = random.Random(rng_seed)
    what = rng.choice(["sitecustomize", "optional", "org"])
    where = rng.choice(["relative", "absolute", "outside", "zip-inside", "zip-outside"])
    print("plant on path:", what, where)
    files = {
        "sitecustomize": ("sitecustomize.py", "pass"),
        "optional": (f"{env.optional}.py", f"import {env.dist}"),
        # copy.py tries `from org.python.core import PyStringMap` (Jython) when present
        "org": ("org/__init__.py", "import copy"),
    }
    member, trigger = files[what]
    body = env.payload().encode()
    if where.startswith("zip"):
        folder = env.site if where == "zip-inside" else env.prefix.parent
        archive = folder / f"extras_{rng.randrange(1000)}.{rng.choice(['zip', 'dat', 'bin'])}"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(member, body)
        line, named = str(archive), archive
    else:
        folder = {
            "relative": env.site / "_local",
            "absolute": env.site / "nested" / "lib",
            "outside": env.prefix.parent / "elsewhere",
        }[where]
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        (folder / member).write_bytes(body)
        line = "_local" if where == "relative" else str(folder)
        named = folder / member
    (env.site / f"zz_{rng.randrange(1000)}.pth").write_text(line + "\n")
    return named, trigger


@pytest.mark.parametrize("case", range(3))
def test_code_on_a_pth_path_entry_is_high(venv: Venv, case: int) -> None:
    seed = seeded().randrange(2**32)
    named, trigger = _plant_on_path(venv, seed + case)
    assert venv.fires(trigger), "the plant does not run: the case proves nothing"
    high = verify(venv)
    # An outside folder is listed at its top level: a package is named by its folder.
    assert any(
        (f.file == str(named) or str(named).startswith(f.file + os.sep))
        and f.rule in {"TG608", "TG624"}
        for f in high
    ), high


@pytest.mark.parametrize("case", range(2))
def test_launcher_not_from_its_template_is_high(venv: Venv, case: int) -> None:
    rng = seeded()
    for _ in range(case):
        rng.random()
    launcher = venv.prefix / "bin" / venv.dist
    body = PIP_BODY.format(module=f"{venv.dist}.cli", name="main")
    payload = venv.payload().strip()
    form = rng.choice(["shebang-option", "trampoline", "body-line"])
    print("launcher:", form)
    if form == "shebang-option":
        # The kernel passes everything after the interpreter as one argument.
        text = f"#!{venv.python} -c{payload}\n" + body
    elif form == "trampoline":
        text = (
            f"#!/bin/sh\n'''exec' \"{venv.python}\" \"$0$(: > {venv.canary})\" \"$@\"\n' '''\n"
            + body
        )
    else:
        text = f"#!{venv.python}\n{payload}\n" + body
    launcher.write_text(text)
    if rng.random() < 0.5:  # rewrite its RECORD row, or drop it
        meta = f"{venv.dist}-1.0.dist-info"
        record = venv.site / meta / "RECORD"
        record.write_text("".join(r for r in record.read_text().splitlines(True) if "bin" not in r))
        if rng.random() < 0.5:
            venv.add_row(meta, os.path.relpath(launcher, venv.site))
    assert venv.fires(argv=[str(launcher)]), "the launcher's payload does not run"
    high = verify(venv)
    assert any(f.file == str(launcher) and f.rule == "TG623" for f in high), high


def test_metadata_alone_vouches_for_nothing(venv: Venv) -> None:
    rng = seeded()
    meta = f"{venv.dist}-1.0.dist-info"
    form = rng.choice(["sitecustomize", "pth-import", "no-record", "autoload", "editable"])
    print("metadata:", form)
    trigger = "pass"
    if form == "sitecustomize":
        (venv.site / "sitecustomize.py").write_text(venv.payload())
        venv.add_row(meta, "sitecustomize.py")
        named = venv.site / "sitecustomize.py"
    elif form == "pth-import":
        (venv.site / "zz_boot.pth").write_text("import " + venv.payload().removeprefix("import "))
        venv.add_row(meta, "zz_boot.pth")
        named = venv.site / "zz_boot.pth"
    elif form == "no-record":
        forged = venv.site / "nvml_extra-1.0.dist-info"
        forged.mkdir()
        (forged / "METADATA").write_text("Metadata-Version: 2.1\nName: nvml-extra\nVersion: 1.0\n")
        (forged / "top_level.txt").write_text(venv.optional + "\n")
        (venv.site / f"{venv.optional}.py").write_text(venv.payload())
        trigger, named = f"import {venv.dist}", forged
    elif form == "autoload":
        # The consumer loads its plugins as torch loads torch.backends at import.
        loader = (
            "from importlib.metadata import entry_points\n"
            "for ep in entry_points(group='torch.backends'):\n    ep.load()()\n"
        )
        init = venv.site / venv.dist / "__init__.py"
        init.write_text(loader)
        forged = "torch_extra-1.0.dist-info"
        plugin = "def autoload():\n    " + venv.payload()
        venv.record(
            forged,
            {
                "torch_extra.py": plugin.encode(),
                f"{forged}/METADATA": b"Metadata-Version: 2.1\nName: torch-extra\nVersion: 1.0\n",
                f"{forged}/entry_points.txt": b"[torch.backends]\nx = torch_extra:autoload\n",
            },
        )
        trigger, named = f"import {venv.dist}", venv.site / forged
    else:  # editable: its source folder holds the optional dependency
        src = venv.prefix.parent / "editable_src"
        src.mkdir()
        (src / f"{venv.optional}.py").write_text(venv.payload())
        forged = "cuda_helpers-0.3.dist-info"
        venv.record(
            forged,
            {
                "__editable__.cuda_helpers-0.3.pth": f"{src}\n".encode(),
                f"{forged}/METADATA": b"Metadata-Version: 2.1\nName: cuda-helpers\nVersion: 0.3\n",
                f"{forged}/direct_url.json": json.dumps(
                    {"url": f"file://{src}", "dir_info": {"editable": True}}
                ).encode(),
            },
        )
        trigger, named = f"import {venv.dist}", src / f"{venv.optional}.py"
    assert venv.fires(trigger), "the plant does not run: the case proves nothing"
    high = verify(venv)
    if form == "autoload":
        # Bytes the installed code loads through the group, from a forged distribution.
        assert any(f.rule == "TG625" for f in high), high
    else:
        assert any(f.file == str(named) for f in high), high


def test_a_stored_verdict_never_hides_a_plant(
    venv: Venv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored verdict's inputs include what the new checks look at: folders outside
    the site that a .pth adds, and launchers with no RECORD row."""
    from trainguard import filestate
    from trainguard.digest_cache import DigestCache

    rng = seeded()
    cache = str(tmp_path / "cache" / "env.json")
    outside = venv.prefix.parent / "elsewhere"
    outside.mkdir()
    (venv.site / "zz_elsewhere.pth").write_text(f"{outside}\n")
    meta = venv.site / f"{venv.dist}-1.0.dist-info"
    record = meta / "RECORD"
    record.write_text("".join(r for r in record.read_text().splitlines(True) if "bin" not in r))

    def run() -> tuple[list[Finding], float | None]:
        result = verify_environment(
            EnvOptions(paths=[str(venv.site)], check_pyc=False, cache=DigestCache(cache))
        )
        return [f for f in result.report.findings if f.severity >= Severity.HIGH], (
            result.stats.reused_from
        )

    # The venv was made a moment ago: without this, the racy window (files changed in
    # the last minute are not remembered) would keep the verdict from being stored.
    monkeypatch.setattr(filestate, "RACY_NS", 0)
    first, _ = run()
    assert {f.rule for f in first} == {"TG607"}, first  # the unvouched .pth pointing outside
    assert run()[1] is not None, "the unchanged environment's verdict was not reused"
    if rng.random() < 0.5:
        named = outside / f"{venv.optional}.py"
        named.write_text(venv.payload())
        rule = "TG624"
    else:
        named = venv.prefix / "bin" / venv.dist
        named.write_text(named.read_text() + venv.payload())
        rule = "TG623"
    print("planted", rule)
    high, reused = run()
    assert reused is None
    assert any(f.rule == rule and f.file == str(named) for f in high), high


def test_only_an_off_host_reference_vouches_for_start_up_code(tmp_path: Path) -> None:
    """A wheel that installs a sitecustomize, a .pth import line and a torch.backends
    entry point: high in plain verify whatever RECORD says; lowered (TG609 low, TG606
    info, no TG625) only when --wheelhouse compared the installed bytes with the wheel,
    and high again once one of them is edited with its RECORD row rewritten."""
    from tests.test_env_wheelhouse import PIP, site_of, write_wheel
    from trainguard.env.wheels import load_reference

    rng = seeded()
    name = f"tgboot{rng.randrange(16**4):04x}"
    meta = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": b"def autoload():\n    return None\n",
        "sitecustomize.py": b"import os\nos.environ.setdefault('TGBOOT', '1')\n",
        f"{name}.pth": b"import os; os.environ.setdefault('TGBOOT_PTH', '1')\n",
        f"{meta}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{meta}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{meta}/entry_points.txt": f"[torch.backends]\nx = {name}:autoload\n".encode(),
    }
    rows = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{meta}/RECORD"] = (rows + f"{meta}/RECORD,,\n").encode()
    wheels = tmp_path / "wheels"
    wheel = write_wheel(wheels, files).rename(wheels / f"{name}-1.0-py3-none-any.whl")
    prefix = tmp_path / "prefix"
    subprocess.run(
        [*PIP, "--no-warn-script-location", "--prefix", str(prefix), str(wheel)],
        check=True,
        capture_output=True,
    )
    site = site_of(prefix)

    def rules(reference: bool) -> dict[str, Severity]:
        ref = load_reference([str(wheels)], None) if reference else None
        options = EnvOptions(paths=[str(site)], check_pyc=False, reference=ref)
        found = verify_environment(options).report.findings
        return {f"{f.rule}:{os.path.basename(f.file)}": f.severity for f in found}

    plain = rules(False)
    assert plain["TG626:sitecustomize.py"] == Severity.HIGH, plain
    assert plain[f"TG626:{name}.pth"] == Severity.HIGH, plain
    assert plain[f"TG625:{meta}"] == Severity.HIGH, plain
    vouched = rules(True)
    assert vouched.get("TG609:sitecustomize.py") == Severity.LOW, vouched
    assert vouched.get(f"TG606:{name}.pth") == Severity.INFO, vouched
    assert not any(s >= Severity.HIGH for s in vouched.values()), vouched
    edited = rng.choice(["sitecustomize.py", f"{name}.pth", f"{name}/__init__.py"])
    path = site / edited
    data = path.read_bytes().replace(b"'1'", b"'2'").replace(b"None", b"0")
    path.write_bytes(data)
    record = site / meta / "RECORD"
    record.write_text(
        "".join(
            f"{edited},{record_hash(data)},{len(data)}\n" if r.split(",")[0] == edited else r
            for r in record.read_text().splitlines(True)
        )
    )
    print("edited", edited)
    after = rules(True)
    assert after.get(f"TG619:{os.path.basename(edited)}") == Severity.CRITICAL, after
    if edited == f"{name}/__init__.py":
        assert after.get(f"TG625:{meta}") == Severity.HIGH, after
    else:
        assert after.get(f"TG626:{os.path.basename(edited)}") == Severity.HIGH, after


def test_editable_install_named_after_an_optional_dependency_is_medium(venv: Venv) -> None:
    """An editable install's own project is not judged as planted code (honest `pip install
    -e` of a library others import); when installed code imports it, that is TG626 medium:
    fails with --strict, and with --lock (TG622) when the project is not locked."""
    src = venv.prefix.parent / "editable_src"
    src.mkdir()
    named = src / f"{venv.optional}.py"
    named.write_text(venv.payload())
    forged = f"{venv.optional}-0.3.dist-info"
    venv.record(
        forged,
        {
            f"__editable__.{venv.optional}-0.3.pth": f"{src}\n".encode(),
            f"{forged}/METADATA": (
                f"Metadata-Version: 2.1\nName: {venv.optional}\nVersion: 0.3\n".encode()
            ),
            f"{forged}/direct_url.json": json.dumps(
                {"url": f"file://{src}", "dir_info": {"editable": True}}
            ).encode(),
        },
    )
    assert venv.fires(f"import {venv.dist}"), "the plant does not run: the case proves nothing"
    report = verify_environment(EnvOptions(paths=[str(venv.site)], check_pyc=False)).report
    assert not [f for f in report.findings if f.severity >= Severity.HIGH]
    assert any(
        f.rule == "TG626" and f.file == str(named) and f.severity == Severity.MEDIUM
        for f in report.findings
    ), report.findings
