"""Plain ``env verify`` against modules planted where installed code will import them,
and ``.pth`` lines that put folders outside the site folders on ``sys.path``.

A planted module shadows nothing installed, so the shadow check cannot see it;
what makes it dangerous is that installed code asks for it when present (an
optional accelerator, a backend).  The tests are generative: a wheel whose
modules ask for optional dependencies in every idiom (a guarded ``import``, a
``from``-import of a submodule inside a function, ``importlib.import_module``,
``find_spec`` through a helper, ``__import__``, a relative import of an
optional submodule) is built with fresh random names each session, and each
case plants one of them in a random form (module, package, namespace
submodule).  The seed is printed; ``TG_PLANT_SEED=N`` replays a run.  Every
plant is first proven to run under the real import system, in a child
process, where its payload only creates a canary file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_env_support import record_hash
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.findings import ScanReport, Severity

SEED = int(os.environ.get("TG_PLANT_SEED") or random.SystemRandom().randrange(2**32))
print(f"test_env_plant: TG_PLANT_SEED={SEED}", file=sys.stderr)
PKG = "tgopt"
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]


def _names(rng: random.Random) -> dict[str, str]:
    """One fresh optional-dependency name per idiom."""
    return {idiom: f"tgx_{idiom}_{rng.randrange(16**6):06x}" for idiom in IDIOMS}


@dataclass(frozen=True)
class Idiom:
    module: str  # the consumer module inside the package
    source: str  # its code; {name} is the optional dependency
    trigger: str  # what a user's program does that reaches the import
    plants: tuple[str, ...]  # forms of the plant this idiom runs: module, package, namespace


IDIOMS: dict[str, Idiom] = {
    "guarded": Idiom(
        "guarded",
        "try:\n    import {name}\nexcept ImportError:\n    {name} = None\n",
        "import tgopt.guarded",
        ("module", "package"),
    ),
    "lazyfrom": Idiom(
        "lazyfrom",
        "def fast():\n    from {name}.kernels import op\n\n    return op\n",
        "import tgopt.lazyfrom as m; m.fast()",
        ("package", "namespace"),
    ),
    "importlib": Idiom(
        "importlib",
        "import importlib\n\n\ndef load():\n    return importlib.import_module('{name}')\n",
        "import tgopt.importlib as m; m.load()",
        ("module", "package"),
    ),
    "findspec": Idiom(
        "findspec",
        "import importlib\nimport importlib.util\n\n\ndef _available(pkg):\n"
        "    return importlib.util.find_spec(pkg) is not None\n\n\n"
        "BACKEND = importlib.import_module('{name}') if _available('{name}') else None\n",
        "import tgopt.findspec",
        ("module", "package"),
    ),
    "dunder": Idiom(
        "dunder",
        "try:\n    backend = __import__('{name}')\nexcept ImportError:\n    backend = None\n",
        "import tgopt.dunder",
        ("module", "package"),
    ),
}
# The package itself tries an optional submodule of its own: tgopt/_accel.py.
INIT = "try:\n    from . import _accel\nexcept ImportError:\n    _accel = None\n"
# A plugin folder: every module in it is imported, whatever its name.
PLUGINS = (
    "import importlib\nimport pkgutil\n\nfor _info in pkgutil.iter_modules(__path__):\n"
    "    importlib.import_module(f'{__name__}.{_info.name}')\n"
)


@dataclass(frozen=True)
class Installed:
    site: Path
    names: dict[str, str]


def _wheel(folder: Path, names: dict[str, str], extra: dict[str, bytes]) -> Path:
    files = {f"{PKG}/__init__.py": INIT.encode(), f"{PKG}/plugins/__init__.py": PLUGINS.encode()}
    for idiom, spec in IDIOMS.items():
        files[f"{PKG}/{spec.module}.py"] = spec.source.format(name=names[idiom]).encode()
    files.update(extra)
    meta = f"{PKG}-1.0.dist-info"
    files[f"{meta}/METADATA"] = f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 1.0\n".encode()
    files[f"{meta}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: trainguard-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{meta}/RECORD"] = (record + f"{meta}/RECORD,,\n").encode()
    wheel = folder / f"{PKG}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@functools.lru_cache(maxsize=1)
def _pristine() -> Installed:
    base = Path(tempfile.mkdtemp(prefix="tg-env-plant-"))
    import atexit

    atexit.register(shutil.rmtree, base, True)
    names = _names(random.Random(SEED))
    wheel = _wheel(base, names, {})
    site = base / "site-packages"
    subprocess.run(
        [*PIP_INSTALL, "--disable-pip-version-check", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return Installed(site, names)


@pytest.fixture()
def installed(tmp_path: Path) -> Installed:
    pristine = _pristine()
    site = tmp_path / "site-packages"
    shutil.copytree(pristine.site, site)
    return Installed(site, pristine.names)


def payload(canary: Path) -> str:
    return f"import pathlib\npathlib.Path({str(canary)!r}).write_text('fired')\n"


def plant(site: Path, name: str, form: str, canary: Path) -> Path:
    """Plant ``name`` in ``form``; returns the file whose code runs."""
    code = payload(canary) + "op = None\n"
    if form == "module":
        target = site / f"{name}.py"
    elif form == "package":
        target = site / name / "__init__.py"
    else:  # a namespace package: no __init__, only the submodule that is imported
        target = site / name / "kernels.py"
    target.parent.mkdir(exist_ok=True)
    target.write_text(code)
    return target


def fires(site: Path, trigger: str, canary: Path, *, site_dir: bool = False) -> bool:
    """Run a user's import in a child process (never in the tests'); did the plant run?"""
    setup = (
        f"import site; site.addsitedir({str(site)!r})"
        if site_dir
        else f"import sys; sys.path.insert(0, {str(site)!r})"
    )
    subprocess.run(
        [sys.executable, "-S", "-B", "-c", f"{setup}; {trigger}"],
        check=False,  # a planted package without the submodule asked for still ran
        capture_output=True,
        cwd=site.parent,
    )
    return canary.exists()


def verify(site: Path) -> ScanReport:
    return verify_environment(EnvOptions(paths=[str(site)], check_pyc=False)).report


def test_the_installed_wheel_is_clean(installed: Installed) -> None:
    report = verify(installed.site)
    assert report.exit_code() == 0, [f for f in report.findings if f.severity >= Severity.HIGH]


@pytest.mark.parametrize("case", range(6))
def test_planted_optional_dependency_is_high(
    installed: Installed, tmp_path: Path, case: int
) -> None:
    rng = random.Random(SEED * 1000 + case)
    idiom = rng.choice(sorted(IDIOMS))
    form = rng.choice(IDIOMS[idiom].plants)
    name = installed.names[idiom]
    canary = tmp_path / "canary"
    planted = plant(installed.site, name, form, canary)
    context = f"seed {SEED} case {case}: {idiom} idiom, {form} plant {name}"
    assert fires(installed.site, IDIOMS[idiom].trigger, canary), context
    report = verify(installed.site)
    found = [f for f in report.findings if f.file == str(planted)]
    assert [(f.rule, f.severity) for f in found] == [("TG604", Severity.HIGH)], context
    assert f"{PKG}/{IDIOMS[idiom].module}.py" in found[0].evidence["imported_by"], context
    assert report.exit_code() == 1, context


def test_planted_optional_submodule_of_an_installed_package_is_high(
    installed: Installed, tmp_path: Path
) -> None:
    """``from . import _accel`` in tgopt/__init__.py: a file added inside the owned package."""
    canary = tmp_path / "canary"
    planted = installed.site / PKG / "_accel.py"
    planted.write_text(payload(canary))
    assert fires(installed.site, f"import {PKG}", canary)
    report = verify(installed.site)
    (found,) = [f for f in report.findings if f.file == str(planted)]
    assert (found.rule, found.severity) == ("TG604", Severity.HIGH)
    assert found.evidence["module"] == f"{PKG}._accel"


def test_unowned_module_nobody_imports_stays_medium(installed: Installed, tmp_path: Path) -> None:
    """No false alarm at high: a stray module no installed code asks for is still reported,
    as unlisted code (medium), like any file pip did not install."""
    rng = random.Random(SEED)
    name = f"tgstray_{rng.randrange(16**6):06x}"
    stray = plant(installed.site, name, rng.choice(["module", "package"]), tmp_path / "c")
    report = verify(installed.site)
    (found,) = [f for f in report.findings if f.file == str(stray)]
    assert (found.rule, found.severity) == ("TG603", Severity.MEDIUM)
    assert report.exit_code() == 0


@pytest.mark.parametrize("case", range(4))
def test_pth_line_pointing_outside_the_site_folder_is_high(
    installed: Installed, tmp_path: Path, case: int
) -> None:
    """A .pth path line is how a folder nobody verifies gets on sys.path; what it holds
    then answers an optional import.  Absolute, relative with .., or through a link."""
    rng = random.Random(SEED * 7919 + case)
    site = installed.site
    outside = tmp_path / f"elsewhere-{rng.randrange(10**6)}"
    outside.mkdir()
    canary = tmp_path / "canary"
    plant(outside, installed.names["guarded"], "module", canary)
    how = rng.choice(["absolute", "relative", "link"])
    if how == "absolute":
        line = str(outside)
    elif how == "relative":
        line = os.path.relpath(outside, site)
    else:
        (site / "vendor").symlink_to(outside, target_is_directory=True)
        line = "vendor"
    pth = site / f"{rng.choice(['zz', 'aa', '_'])}extra-{case}.pth"
    lines = [line]
    if rng.random() < 0.5:
        lines.insert(0, "# added by a setup script")
    pth.write_text("\n".join(lines) + "\n")
    context = f"seed {SEED} case {case}: {how} line {line!r}"
    assert fires(site, IDIOMS["guarded"].trigger, canary, site_dir=True), context
    report = verify(site)
    found = [f for f in report.findings if f.file == str(pth) and f.rule == "TG607"]
    assert [f.severity for f in found] == [Severity.HIGH], context
    assert found[0].evidence["folder"] == str(outside.resolve()), context
    assert report.exit_code() == 1, context


def _add_record_row(site: Path, path: Path) -> None:
    data = path.read_bytes()
    record = site / f"{PKG}-1.0.dist-info" / "RECORD"
    rel = os.path.relpath(path, site)
    rows = [r for r in record.read_text().splitlines() if r.split(",")[0] != rel]
    record.write_text("\n".join([*rows, f"{rel},{record_hash(data)},{len(data)}"]) + "\n")


def _editable_dist(site: Path, source: Path) -> Path:
    """What pip writes for ``pip install -e``: metadata, direct_url.json saying
    editable and a .pth naming the source folder, all listed in RECORD; no code."""
    meta = site / "tgedit-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: tgedit\nVersion: 1.0\n")
    (meta / "direct_url.json").write_text(
        f'{{"url": "file://{source}", "dir_info": {{"editable": true}}}}'
    )
    pth = site / "__editable__.tgedit-1.0.pth"
    pth.write_text(f"{source}\n")
    rows = []
    for path in [meta / "METADATA", meta / "direct_url.json", pth]:
        data = path.read_bytes()
        rows.append(f"{os.path.relpath(path, site)},{record_hash(data)},{len(data)}")
    (meta / "RECORD").write_text("\n".join([*rows, "tgedit-1.0.dist-info/RECORD,,"]) + "\n")
    return pth


def test_owned_pth_pointing_outside_is_what_editable_installs_do(
    installed: Installed, tmp_path: Path
) -> None:
    """An editable install's .pth names its source folder, RECORD lists it with its hash,
    and direct_url.json says editable: not an alarm (TG613 says the code is unverified)."""
    site = installed.site
    source = tmp_path / "src"
    (source / "tgedit").mkdir(parents=True)
    pth = _editable_dist(site, source)
    report = verify(site)
    assert not [f for f in report.findings if f.file == str(pth)]
    assert report.exit_code() == 0
    (info,) = [f for f in report.findings if f.evidence.get("editable")]
    assert (info.rule, info.evidence["editable"]) == ("TG613", str(source))
    # The same file edited afterwards (RECORD not rewritten) is the attack again.
    pth.write_text(f"{tmp_path / 'elsewhere'}\n")
    assert verify(site).exit_code() == 1


def test_a_distribution_with_code_in_the_site_folder_is_not_made_editable_by_a_claim(
    installed: Installed, tmp_path: Path
) -> None:
    """Red team env_editable_1: direct_url.json is as writable as the code.  A
    distribution whose RECORD lists code in the site folder and that says it is
    editable is not one: no TG613 exemption, and its .pth pointing outside is high."""
    site = installed.site
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    url = site / f"{PKG}-1.0.dist-info" / "direct_url.json"
    url.write_text(f'{{"url": "file://{outside}", "dir_info": {{"editable": true}}}}')
    _add_record_row(site, url)
    pth = site / f"__editable__.{PKG}-1.0.pth"
    pth.write_text(f"{outside}\n")
    _add_record_row(site, pth)
    report = verify(site)
    assert not [f for f in report.findings if f.evidence.get("editable")]
    (found,) = [f for f in report.findings if f.file == str(pth)]
    assert (found.rule, found.severity) == ("TG607", Severity.HIGH)
    assert report.exit_code() == 1


def test_planted_pth_with_a_record_row_added_is_still_high(
    installed: Installed, tmp_path: Path
) -> None:
    """An attacker who adds the planted .pth's row (with its hash) to an installed RECORD
    makes it "owned and unchanged"; only an editable install has a reason to point
    outside, and this distribution is not one."""
    site = installed.site
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    canary = tmp_path / "canary"
    plant(outside, installed.names["guarded"], "module", canary)
    pth = site / "tgopt-extras.pth"
    pth.write_text(f"{outside}\n")
    _add_record_row(site, pth)
    assert fires(site, IDIOMS["guarded"].trigger, canary, site_dir=True)
    report = verify(site)
    (found,) = [f for f in report.findings if f.file == str(pth)]
    assert (found.rule, found.severity) == ("TG607", Severity.HIGH)
    assert "not an editable install" in found.message
    assert report.exit_code() == 1


@pytest.mark.skipif(importlib.util.find_spec("winreg") is not None, reason="winreg exists here")
def test_module_the_standard_library_tries_when_present_is_high(
    installed: Installed, tmp_path: Path
) -> None:
    """``mimetypes`` tries ``import winreg`` at import time; off Windows there is none, so
    a ``winreg.py`` in a site folder runs in every process that imports mimetypes (and
    email, http, urllib do).  No installed distribution refers to it: the stdlib does."""
    canary = tmp_path / "canary"
    planted = plant(installed.site, "winreg", "module", canary)
    assert fires(installed.site, "import mimetypes", canary, site_dir=True)
    report = verify(installed.site)
    (found,) = [f for f in report.findings if f.file == str(planted)]
    assert (found.rule, found.severity) == ("TG604", Severity.HIGH)
    assert "mimetypes.py" in found.evidence["imported_by"]


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import a.b as c", None, {"a.b"}),
        ("from a import b", None, {"a", "a.b"}),
        ("def f():\n    from .fast import k", ["pkg", "sub"], {"pkg.sub.fast", "pkg.sub.fast.k"}),
        ("from .. import x", ["pkg", "sub"], {"pkg", "pkg.x"}),
        ("from ... import x", ["pkg"], set()),  # beyond the top: nothing it could name
        ("p = '.'.join(['tzdata.zoneinfo', *parts])", None, {".", "tzdata.zoneinfo"}),
        ("m = importlib.import_module(name='apex.amp')", None, {"apex.amp"}),
        ("x = 'apex'  # a string that no call receives", None, set()),
    ],
)
def test_references_read_statically(
    source: str, package: list[str] | None, expected: set[str]
) -> None:
    import ast

    from trainguard.env.imports import references

    got = {ref for ref, _, _ in references(ast.parse(source), package)}
    assert {r for r in got if r != "."} == {e for e in expected if e != "."}


def test_a_source_that_does_not_parse_counts_when_it_mentions_the_name(tmp_path: Path) -> None:
    from trainguard.env.imports import find_importers

    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    import tgx_opt\n")
    clean = tmp_path / "clean.py"
    clean.write_text("import os\n")
    found = find_importers(
        {"tgx_opt", "tgx_other"}, [(str(clean), str(tmp_path)), (str(broken), str(tmp_path))]
    )
    assert set(found) == {"tgx_opt"}
    assert found["tgx_opt"].file == str(broken) and "not parsed" in found["tgx_opt"].how


def test_module_planted_in_a_plugin_folder_is_high(installed: Installed, tmp_path: Path) -> None:
    """tgopt/plugins imports every module pkgutil lists there: any name runs."""
    rng = random.Random(SEED + 17)
    name = f"p{rng.randrange(16**8):08x}"
    canary = tmp_path / "canary"
    planted = installed.site / PKG / "plugins" / f"{name}.py"
    planted.write_text(payload(canary))
    (installed.site / PKG / "plugins" / "README.txt").write_text("not a module\n")
    assert fires(installed.site, f"import {PKG}.plugins", canary), f"seed {SEED}: {name}"
    report = verify(installed.site)
    (found,) = [f for f in report.findings if f.file == str(planted)]
    assert (found.rule, found.severity) == ("TG604", Severity.HIGH)
    assert (
        "iter_modules" in found.message and "plugins/__init__.py" in found.evidence["imported_by"]
    )
    readme = [f for f in report.findings if f.file.endswith("README.txt")]
    assert [(f.rule, f.severity) for f in readme] == [("TG603", Severity.LOW)]


def test_module_added_to_a_package_that_imports_only_by_name_stays_medium(
    installed: Installed, tmp_path: Path
) -> None:
    """tgopt imports _accel by name and nothing by computed name: another added module is
    unlisted code (medium), not something that runs."""
    stray = installed.site / PKG / "stray_helpers.py"
    stray.write_text(payload(tmp_path / "canary"))
    assert not fires(installed.site, f"import {PKG}", tmp_path / "canary")
    (found,) = [f for f in verify(installed.site).findings if f.file == str(stray)]
    assert (found.rule, found.severity) == ("TG603", Severity.MEDIUM)


@pytest.mark.parametrize(
    "source",
    [
        "try: import {n}\nexcept ImportError: pass\n",
        "import os, {n}\n",
        "x = 1; from {n}.sub import y\n",
        "def f():\n    return __import__(name='{n}')\n",
        "m = importlib.import_module(f'{n}')\n",
        "from {n} import (\n    a,\n    b,\n)\n",
    ],
)
def test_the_byte_sieve_keeps_every_way_of_referring(tmp_path: Path, source: str) -> None:
    """Only files whose bytes may refer to the name are parsed: no idiom the parse would
    find may be sieved out first."""
    from trainguard.env.imports import find_importers

    code = tmp_path / "user.py"
    code.write_text(source.format(n="tgx_opt"))
    found = find_importers({"tgx_opt"}, [(str(code), str(tmp_path))])
    assert set(found) == {"tgx_opt"} and found["tgx_opt"].line > 0
    # The name as a tail of another is no reference: a.tgx_opt, tgx_optimal.
    code.write_text("import a.tgx_opt\nimport tgx_optimal\nx = 'b.tgx_opt'\n")
    assert find_importers({"tgx_opt"}, [(str(code), str(tmp_path))]) == {}
