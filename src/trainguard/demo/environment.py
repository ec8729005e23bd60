"""The demo's Python environment: a small installed package whose source gets edited.

In the incident the attacker edited the cluster's PyTorch source.  The demo
installs ``clusteropt 2.13.0`` (a stand-in with a clipping function, as a wheel
installer lays it out: the files plus a RECORD of their sha256) into a folder,
seals a snapshot of it, then edits the clipping code the way the attacker did
and, as a careful attacker would, rewrites the file's RECORD line to match.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

NAME, VERSION = "clusteropt", "2.13.0"
CLIP_MODULE = f"{NAME}/clip.py"
CLIP_SOURCE = '''"""Gradient clipping, as the training jobs of the cluster import it."""


def clip_grad_norm_(grads, max_norm):
    total = sum(float((g * g).sum()) for g in grads) ** 0.5
    scale = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(scale)
    return total
'''
# The attacker's edit: large jobs only, and the gradient flips instead of shrinking.
SABOTAGED_SOURCE = CLIP_SOURCE.replace(
    "    for g in grads:\n        g.mul_(scale)\n",
    "    import os\n"
    "    if int(os.environ.get('WORLD_SIZE', '1')) >= 256:\n"
    "        scale = -scale\n"
    "    for g in grads:\n        g.mul_(scale)\n",
)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def install(site: Path) -> None:
    """Lay out the distribution in ``site`` as pip would for a pure-Python wheel."""
    files = {
        f"{NAME}/__init__.py": b'"""clusteropt: the optimizer utilities of the cluster."""\n',
        CLIP_MODULE: CLIP_SOURCE.encode(),
        f"{NAME}-{VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
        ).encode(),
        f"{NAME}-{VERSION}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: trainguard-demo\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        f"{NAME}-{VERSION}.dist-info/INSTALLER": b"pip\n",
    }
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{NAME}-{VERSION}.dist-info/RECORD"] = (
        record + f"{NAME}-{VERSION}.dist-info/RECORD,,\n"
    ).encode()
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def tamper(site: Path) -> None:
    """Edit the clipping code and make RECORD agree, as a careful attacker would."""
    clip = site / CLIP_MODULE
    new = SABOTAGED_SOURCE.encode()
    clip.write_bytes(new)
    record = site / f"{NAME}-{VERSION}.dist-info" / "RECORD"
    lines = []
    for line in record.read_text().splitlines():
        if line.startswith(CLIP_MODULE + ","):
            line = f"{CLIP_MODULE},{_record_hash(new)},{len(new)}"
        lines.append(line)
    record.write_text("\n".join(lines) + "\n")
