"""Generated torch.package archives whose own modules run code when imported.

``PackageImporter.load_pickle`` imports the module that defines a pickled class
from the archive itself (module-level code runs); ``import_module`` does the
same by name.  Each mutant ships one module whose import creates the canary by
a different route (no ``os.system`` spelled in most); the loader
``torch-package`` calls ``load_pickle`` on a pickle naming a class from it.
Building needs torch (``PackageExporter`` writes the archive; nothing is loaded).
"""

from __future__ import annotations

import random
from pathlib import Path

from trainguard.samples.base import Sample

# How the module's top level creates the canary (the path is the format field).
PAYLOADS: dict[str, str] = {
    "pathlib": "import pathlib\npathlib.Path({c!r}).write_text('pkg')\n",
    "open": "with open({c!r}, 'w') as fh:\n    fh.write('pkg')\n",
    "os-alias": "from os import mkdir as make\nmake({c!r})\n",
    "importlib": "import importlib\nimportlib.import_module('os').mkdir({c!r})\n",
    "getattr-builtins": "getattr(__builtins__, 'op' + 'en', None) or 0\nopen({c!r}, 'a').close()\n",
    "in-class": "class Helper:\n    import io as _io\n    _io.open({c!r}, 'w').close()\n",
}
_CLASS = "\nclass Scaler:\n    def __init__(self, k: float = 1.0) -> None:\n        self.k = k\n"
# A protocol-2 pickle of trainer_utils.Scaler() with state {'k': 1.0}.
_PICKLE = (
    b"\x80\x02ctrainer_utils\nScaler\n)\x81}X\x01\x00\x00\x00kG?\xf0\x00\x00\x00\x00\x00\x00sb."
)
LOADER = "torch-package"


def pkg_mutant(payload: str) -> Sample:
    ident = f"pkg-{payload}"

    def build(folder: Path, canary: Path) -> Path:
        from torch.package.package_exporter import PackageExporter  # building only

        path = folder / f"{ident}.pt"
        with PackageExporter(str(path)) as pe:
            # What the module imports comes from the loading environment, as in
            # any archive that externs torch.
            pe.extern(["pathlib", "os", "importlib", "io"])
            src = PAYLOADS[payload].format(c=str(canary)) + _CLASS
            pe.save_source_string("trainer_utils", src)
            pe.save_binary("pkg", "obj.pkl", _PICKLE)
        return path

    title = f"torch.package module creating a file at import ({payload})"
    return Sample(ident, title, title, "", LOADER, True, True, "critical", ("torch",), build)


def draw_pkg(rng: random.Random) -> Sample:
    return pkg_mutant(rng.choice(sorted(PAYLOADS)))
