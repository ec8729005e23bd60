"""protect() guards the loaders of models that carry code: TorchScript, torch.package, .pt2.

Honest archives load as before (outputs equal to the unguarded load); an
archive the scanner rates high is refused before the loader sees it.  Each
load runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

_LOAD = textwrap.dedent(
    """
    import sys, torch, trainguard
    folder = sys.argv[1]
    x = torch.arange(8.0).reshape(2, 4)
    def run():
        out = {}
        out["jit"] = torch.jit.load(f"{folder}/scripted.pt")(x)
        out["jit via torch.load"] = torch.load(f"{folder}/scripted.pt", weights_only=False)(x)
        out["export"] = torch.export.load(f"{folder}/exported.pt2").module()(x)
        from torch.package import PackageImporter
        out["package"] = PackageImporter(f"{folder}/packaged.pt").load_pickle("m", "m.pkl")(x)
        return out
    plain = run()
    trainguard.protect()
    guarded = run()
    for name in plain:
        print(name, bool(torch.equal(plain[name], guarded[name])))
    try:
        torch.jit.load(f"{folder}/tampered.pt")
        print("tampered loaded")
    except trainguard.UnsafeModelError as exc:
        print("tampered refused", exc.findings[0].rule)
    """
)


def _build(folder: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    torch.jit.save(torch.jit.script(model), folder / "scripted.pt")
    exported = torch.export.export(model, (torch.zeros(2, 4),))
    torch.export.save(exported, folder / "exported.pt2")
    from torch.package import PackageExporter

    # torch's own exporter warns about its use of TypedStorage (not ours to fix).
    with warnings.catch_warnings(), PackageExporter(folder / "packaged.pt") as exporter:
        warnings.simplefilter("ignore", UserWarning)
        exporter.extern("torch.**")
        exporter.save_pickle("m", "m.pkl", model)
    # A TorchScript archive with a pickle member that runs os.system when torch reads it.
    with zipfile.ZipFile(folder / "scripted.pt") as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    evil = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    name = next(n for n in members if n.endswith("constants.pkl"))
    members[name] = evil
    with zipfile.ZipFile(folder / "tampered.pt", "w", zipfile.ZIP_STORED) as out:
        for member, data in members.items():
            out.writestr(member, data)


def test_code_carrying_models_load_under_protect_and_a_tampered_one_is_refused(
    tmp_path: Path,
) -> None:
    _build(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        "jit True",
        "jit via torch.load True",
        "export True",
        "package True",
    ], proc.stdout
    assert lines[4].startswith("tampered refused"), proc.stdout
