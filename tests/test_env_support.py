"""Helpers for the environment tests: a tiny real wheel, installed by pip, and tamperers.

The wheel ``tgdemo 1.0`` holds a package with an optimizer-like function, a
data file and a ``.pth`` with an import line (a harmless one, like setuptools'
distutils-precedence.pth).  pip installs it into a throwaway folder with
``--target``, so RECORD and the compiled ``.pyc`` files are pip's own.  No
test imports anything from these folders: tampered code only ever runs in a
subprocess, where it proves the attack is real.
"""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME, VERSION = "tgdemo", "1.0"
OPTIM_SOURCE = '''"""A plain SGD step, the module the tests tamper with."""


def step(weight, grad, lr=0.1):
    return weight - lr * grad
'''
FLIPPED_SOURCE = OPTIM_SOURCE.replace("weight - lr * grad", "weight + lr * grad")
# The wheel's own start-up hook: setuptools' generated distutils-precedence line, the one
# import line that a RECORD row alone vouches for (any other is TG626: test_env_classes).
BOOT_PTH = (
    "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') "
    "== 'local'; enabled and __import__('_distutils_hack').add_shim(); \n"
)
TAG = sys.implementation.cache_tag


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build_wheel(folder: Path) -> Path:
    files = {
        f"{NAME}/__init__.py": b'"""tgdemo: a tiny package for trainguard\'s tests."""\n',
        f"{NAME}/optim.py": OPTIM_SOURCE.encode(),
        f"{NAME}/data.txt": b"weights: 1 2 3\n",
        "tgdemo_boot.pth": BOOT_PTH.encode(),
        f"{NAME}-{VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
        ).encode(),
        f"{NAME}-{VERSION}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: trainguard-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    record += f"{NAME}-{VERSION}.dist-info/RECORD,,\n"
    files[f"{NAME}-{VERSION}.dist-info/RECORD"] = record.encode()
    wheel = folder / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@functools.lru_cache(maxsize=1)
def _pristine() -> Path:
    base = Path(tempfile.mkdtemp(prefix="tg-env-pristine-"))
    atexit.register(shutil.rmtree, base, True)
    wheel = build_wheel(base)
    site = base / "site-packages"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return site


def fresh_site(tmp_path: Path) -> Path:
    """A copy of the pip-installed site folder (mtimes kept, so its pycs stay valid)."""
    site = tmp_path / "site-packages"
    shutil.copytree(_pristine(), site)
    return site


def pyc_path(source: Path) -> Path:
    return source.parent / "__pycache__" / f"{source.stem}.{TAG}.pyc"


def write_swapped_pyc(source: Path, other_source: str) -> Path:
    """Compile ``other_source`` and store it as ``source``'s cached pyc, with a header
    matching ``source``'s mtime and size, so the interpreter loads it."""
    code = compile(other_source, str(source), "exec", dont_inherit=True)
    st = source.stat()
    header = (
        importlib.util.MAGIC_NUMBER
        + (0).to_bytes(4, "little")
        + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )
    target = pyc_path(source)
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(header + marshal.dumps(code))
    return target


def rewrite_record_line(site: Path, relpath: str) -> None:
    """Make RECORD agree with the file's current content (what a careful attacker does)."""
    record = site / f"{NAME}-{VERSION}.dist-info" / "RECORD"
    data = (site / relpath).read_bytes()
    lines = []
    for line in record.read_text().splitlines():
        if line.split(",")[0] == relpath:
            line = f"{relpath},{record_hash(data)},{len(data)}"
        lines.append(line)
    record.write_text("\n".join(lines) + "\n")


def edit_keeping_mtime(path: Path, old: str, new: str) -> None:
    """Edit a file and put its mtime back (the size stays the same when old and new do)."""
    st = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def run_in_subprocess(site: Path, code: str) -> str:
    """Run ``code`` with ``site`` on the path, in a child process (never in the tests')."""
    prog = f"import sys; sys.path.insert(0, {str(site)!r}); {code}"
    out = subprocess.run(
        [sys.executable, "-S", "-B", "-c", prog],
        check=True,
        capture_output=True,
        text=True,
        cwd=site.parent,
    )
    return out.stdout.strip()
