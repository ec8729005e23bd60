"""Red team 5 (red_env2 A4): an entry point in a group installed code loads at run time.

A library (built here with a fresh name each run) loads a plug-in group in one of the
idioms real ones use (``entry_points(group=...)``, ``.select(group=...)``,
``entry_points()[...]``, a helper given the group's name); a forged distribution with a
right RECORD declares an entry point in it.  The plant is proven to run in a child
process (the payload appends to a canary), then verify must name it: TG625 medium in
a plain verify, high with a reference that does not vouch for it.  Honest twins: the
library's own entry point in its own group, and a plug-in in a group nothing loads.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from tests.seeds import seeded
from tests.test_env_native import _dist
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.env.wheels import Reference
from trainguard.findings import Finding, Severity

IDIOMS = {
    "keyword": "from importlib.metadata import entry_points\n\n\ndef plugins():\n"
    "    return [ep.load()() for ep in entry_points(group={group!r})]\n",
    "select": "import importlib.metadata as md\n\n\ndef plugins():\n"
    "    return [ep.load()() for ep in md.entry_points().select(group={group!r})]\n",
    "subscript": "import importlib.metadata as md\n\n\ndef plugins():\n"
    "    eps = md.entry_points()\n    found = eps.select(group={group!r}) if hasattr(eps, 'select')"
    " else eps[{group!r}]\n    return [ep.load()() for ep in found]\n",
    "helper": "from importlib.metadata import entry_points\n\n\ndef _load(group):\n"
    "    return [ep.load()() for ep in entry_points(group=group)]\n\n\n"
    "def plugins():\n    return _load({group!r})\n",
}


def _entry_points(group: str, name: str, target: str) -> bytes:
    return f"[{group}]\n{name} = {target}\n".encode()


def _tg625(site: Path, reference: Reference | None = None) -> list[Finding]:
    opts = EnvOptions(paths=[str(site)], check_pyc=False, reference=reference)
    return [f for f in verify_environment(opts).report.findings if f.rule == "TG625"]


def _build(tmp: Path, rng: random.Random) -> tuple[Path, str, str]:
    tag = f"{rng.randrange(16**6):06x}"
    lib, group = f"tglib_{tag}", rng.choice([f"tglib_{tag}.callbacks", f"tg{tag}_backends"])
    site = tmp / "site-packages"
    idiom = rng.choice(sorted(IDIOMS))
    print("idiom", idiom, "group", group)
    _dist(
        site,
        lib,
        {
            f"{lib}/__init__.py": b"",
            f"{lib}/registry.py": IDIOMS[idiom].format(group=group).encode(),
            f"{lib}/own.py": b"def make():\n    return 'own'\n",
            f"{lib}-1.0.dist-info/entry_points.txt": _entry_points(group, "own", f"{lib}.own:make"),
        },
    )
    return site, lib, group


def _run(site: Path, lib: str) -> str:
    code = f"import sys; sys.path.insert(0, {str(site)!r}); import {lib}.registry as r"
    code += "; print(r.plugins())"
    return subprocess.run(
        [sys.executable, "-S", "-c", code], check=True, capture_output=True, text=True
    ).stdout


def test_plugin_in_a_loaded_group_is_named(tmp_path: Path) -> None:
    rng = seeded()
    site, lib, group = _build(tmp_path, rng)
    assert _run(site, lib).strip() == "['own']"
    assert not _tg625(site), "a library's own entry point in its own group is its wiring"
    # A plug-in in a group nothing loads is honest too.
    _dist(
        site,
        "tgidle",
        {
            "tgidle.py": b"def f():\n    return 1\n",
            "tgidle-1.0.dist-info/entry_points.txt": _entry_points(
                f"nobody_loads_{rng.randrange(1000)}", "x", "tgidle:f"
            ),
        },
    )
    assert not _tg625(site)
    canary = tmp_path / "canary"
    plug = f"tgplug_{rng.randrange(16**6):06x}"
    _dist(
        site,
        plug,
        {
            f"{plug}.py": f"def hook():\n    import os\n    open({str(canary)!r}, 'a')"
            ".write('fired %d\\n' % os.getpid())\n    return 'x'\n".encode(),
            f"{plug}-1.0.dist-info/entry_points.txt": _entry_points(group, "p", f"{plug}:hook"),
        },
    )
    _run(site, lib)
    assert "fired" in canary.read_text(), "the library ran the planted plug-in"
    plain = _tg625(site)
    assert [(f.severity, f.evidence["group"]) for f in plain] == [(Severity.MEDIUM, group)]
    assert plug in plain[0].message
    # An off-host reference that holds no wheel for it cannot vouch: high.
    referenced = _tg625(site, Reference(label=str(tmp_path / "wheels")))
    assert any(f.severity == Severity.HIGH and plug in f.message for f in referenced)
