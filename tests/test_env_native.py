"""Red team 5 (red_env2 A1, A5, A7): code that runs without Python importing it by name.

* A1: a shared library with no RECORD row inside an installed package's folder, found
  by the dynamic loader's search path (``$ORIGIN`` first) instead of the system
  library a shipped library needs: its constructor runs when the shipped one loads.
  TG627 high, whatever the planted file is called (the loader reads its magic).
* A7: the same library vouched for by a row in ANOTHER distribution's RECORD: TG628.
* A5: a link at the import root to a package folder elsewhere: TG604 high, named as
  the package ``import`` runs.

The site folders are built here by hand (RECORD rows hashed like pip's); the libraries
are compiled with the system C compiler when there is one, and every plant is proven
to run in a child process, where its payload only appends to a canary file.  Without a
compiler the loader plant is still detected by its name (asserted), not proven to run.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.seeds import seeded
from tests.test_env_support import record_hash
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.findings import Finding, Severity

CC = shutil.which("cc") or shutil.which("gcc")
ELF_HOST = sys.platform.startswith("linux")


def _dist(site: Path, name: str, files: dict[str, bytes]) -> None:
    """Install ``files`` (relative to ``site``) as distribution ``name`` 1.0, with RECORD."""
    meta = site / f"{name}-1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    rows = []
    for rel, data in files.items():
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rows.append(f"{rel},{record_hash(data)},{len(data)}")
    meta_rel = f"{name}-1.0.dist-info"
    rows.append(f"{meta_rel}/METADATA,{record_hash((meta / 'METADATA').read_bytes())},")
    rows.append(f"{meta_rel}/RECORD,,")
    (meta / "RECORD").write_text("\n".join(rows) + "\n")


def _add_row(site: Path, name: str, rel: str) -> None:
    data = (site / rel).read_bytes()
    record = site / f"{name}-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + f"{rel},{record_hash(data)},{len(data)}\n")


def _cc(args: list[str], cwd: Path) -> None:
    assert CC is not None
    subprocess.run([CC, *args], check=True, capture_output=True, cwd=cwd)


def _findings(site: Path) -> list[Finding]:
    report = verify_environment(EnvOptions(paths=[str(site)], check_pyc=False)).report
    return report.findings


def _high(site: Path) -> list[Finding]:
    return [f for f in _findings(site) if f.severity >= Severity.HIGH]


class Layout:
    """A package ``pkg`` shipping ``libmain`` whose loader search path is its own folder
    first, then a 'system' folder outside the site holding the library it needs (a
    stand-in for libgcc_s in /lib: DT_RPATH '$ORIGIN:<sys>')."""

    def __init__(self, tmp: Path, rng: random.Random) -> None:
        tag = f"{rng.randrange(16**6):06x}"
        self.pkg = f"tgpkg_{tag}"
        self.other = f"tgother_{tag}"
        self.libdir = rng.choice(["lib", "_libs", "lib/native"])
        # The loader needs the library by this name, which may look like anything.
        self.needed = rng.choice([f"libtgdep{tag}.so.1", f"libtgdep{tag}.so", f"tgdep{tag}.dat"])
        self.site = tmp / "site-packages"
        self.sysdir = tmp / "syslib"
        self.build = tmp / "build"
        self.canary = tmp / "canary"
        for folder in (self.site, self.sysdir, self.build):
            folder.mkdir()
        files = {
            f"{self.pkg}/__init__.py": b"",
            f"{self.pkg}/{self.libdir}/README.txt": b"native code\n",
        }
        if CC is not None and ELF_HOST:
            (self.build / "dep.c").write_text("int tg_dep(void) { return 1; }\n")
            _cc(["-shared", "-fPIC", "-o", str(self.sysdir / self.needed), "dep.c"], self.build)
            (self.build / "main.c").write_text("int tg_main(void) { return 2; }\n")
            rpath = f"$ORIGIN:{self.sysdir}"
            _cc(
                [
                    "-shared",
                    "-fPIC",
                    "-o",
                    "libmain.so",
                    "main.c",
                    "-Wl,--no-as-needed",
                    f"-Wl,--disable-new-dtags,-rpath,{rpath}",
                    f"-L{self.sysdir}",
                    f"-l:{self.needed}",
                ],
                self.build,
            )
            files[f"{self.pkg}/{self.libdir}/libmain.so"] = (self.build / "libmain.so").read_bytes()
        _dist(self.site, self.pkg, files)
        _dist(self.site, self.other, {f"{self.other}/__init__.py": b""})

    @property
    def planted(self) -> Path:
        return self.site / self.pkg / self.libdir / self.needed

    def plant(self) -> None:
        if CC is not None and ELF_HOST:
            (self.build / "shim.c").write_text(
                "#include <stdio.h>\n#include <unistd.h>\n"
                "__attribute__((constructor)) static void fire(void) {\n"
                f'  FILE *f = fopen("{self.canary}", "a");\n'
                '  if (f) { fprintf(f, "fired %d\\n", (int)getpid()); fclose(f); }\n}\n'
                "int tg_dep(void) { return 1; }\n"
            )
            _cc(["-shared", "-fPIC", "-o", str(self.planted), "shim.c"], self.build)
        else:  # detected by its name alone: a library's name (see module doc)
            self.planted.write_bytes(b"\0" * 64)

    def fires(self) -> bool:
        """Load the shipped library in a child process; whether the plant ran."""
        lib = self.site / self.pkg / self.libdir / "libmain.so"
        subprocess.run(
            [sys.executable, "-S", "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"],
            check=True,
            capture_output=True,
        )
        return self.canary.exists() and "fired" in self.canary.read_text()


def test_loader_plant_is_high_whatever_its_name(tmp_path: Path) -> None:
    rng = seeded()
    layout = Layout(tmp_path, rng)
    assert not _high(layout.site), "the honest package folder is clean"
    native = CC is not None and ELF_HOST
    if native:
        assert not layout.fires()
    if not native and not layout.needed.endswith((".so", ".so.1")):
        pytest.skip("no C compiler: a plant without a library's name needs real ELF magic")
    layout.plant()
    if native:
        assert layout.fires(), "the loader ran the planted library's constructor"
    high = _high(layout.site)
    assert [(f.rule, f.file) for f in high] == [("TG627", str(layout.planted))]
    # A data file nobody lists in the same folder stays below high (an honest leftover).
    layout.planted.unlink()
    (layout.planted.parent / "notes.txt").write_text("not code\n")
    assert not _high(layout.site)


def test_foreign_record_row_is_high(tmp_path: Path) -> None:
    rng = seeded()
    layout = Layout(tmp_path, rng)
    layout.plant()
    _add_row(layout.site, layout.other, str(layout.planted.relative_to(layout.site)))
    if CC is not None and ELF_HOST:
        assert layout.fires()
    high = _high(layout.site)
    assert [(f.rule, f.file) for f in high] == [("TG628", str(layout.planted))]
    assert layout.other in high[0].message


def test_shared_namespace_rows_are_not_foreign(tmp_path: Path) -> None:
    """Honest twin of TG628: several distributions list one namespace ``__init__.py``
    and their own sub-folders (nvidia-*, backports.*): nobody's rows are foreign."""
    rng = seeded()
    site = tmp_path / "site-packages"
    names = [f"tgns_part{i}_{rng.randrange(1000)}" for i in range(rng.randint(2, 4))]
    for name in names:
        _dist(
            site,
            name,
            {
                "tgns/__init__.py": b"",
                f"tgns/{name}/__init__.py": b"",
                f"tgns/{name}/x.py": b"X=1\n",
            },
        )
    assert not _high(site)


def test_linked_package_folder_is_named_as_the_package(tmp_path: Path) -> None:
    rng = seeded()
    site = tmp_path / "site-packages"
    _dist(site, "tghonest", {"tghonest/__init__.py": b""})
    name = f"tglinked_{rng.randrange(16**6):06x}"
    elsewhere = tmp_path / "share" / rng.choice(["pkgs", "x/y"]) / name
    elsewhere.mkdir(parents=True)
    canary = tmp_path / "canary"
    (elsewhere / "__init__.py").write_text(
        f"import os\nopen({str(canary)!r}, 'a').write('fired %d\\n' % os.getpid())\n"
    )
    assert not _high(site)
    os.symlink(elsewhere, site / name)
    subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); import {name}",
        ],
        check=True,
        capture_output=True,
    )
    assert "fired" in canary.read_text()
    high = [f for f in _high(site) if f.rule == "TG604"]
    assert [f.file for f in high] == [str(site / name)]
    assert high[0].evidence["module"] == name
