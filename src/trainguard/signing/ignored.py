"""Ignored entries that a loader would pick up: an ignore must not hide a model.

``--ignore`` exists for logs and scratch files.  A pattern that also covers
what a loader reads (a new ``checkpoint-*`` folder that the Trainer's "last
checkpoint" logic resumes from, a ``*.safetensors`` or ``pytorch_model*.bin``
that ``from_pretrained`` loads, a ``*.py`` that ``trust_remote_code`` imports)
lets an attacker plant one that verification never looks at.  So every
ignored entry is judged two ways, and either makes it a warning (TG510):

- by the names loaders look for (:data:`_LOADER_NAMES`, Trainer's
  ``checkpoint-N`` folders);
- by its first bytes: any file that starts like a model container (zip,
  pickle, safetensors, GGUF, HDF5, NumPy) is loadable whatever its name.

Bounded: at most :data:`MAX_ENTRIES` entries looked at below ignored folders,
:data:`MAGIC_BYTES` read from each file, :data:`MAX_FINDINGS` reported.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat

from trainguard.findings import Finding
from trainguard.rules import rule

MAX_ENTRIES = 5000
MAX_DEPTH = 6
MAGIC_BYTES = 16
MAX_FINDINGS = 50
# transformers' Trainer resumes from the highest checkpoint-N folder (PREFIX_CHECKPOINT_DIR).
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
_LOADER_NAMES = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.pickle",
    "*.joblib",
    "*.npy",
    "*.npz",
    "*.gguf",
    "*.ggml",
    "*.onnx",
    "*.h5",
    "*.keras",
    "*.msgpack",
    "*.tflite",
    "*.mar",
    "*.nemo",
    "pytorch_model*",
    "adapter_model*",
    "*.model",  # sentencepiece tokenizers
    "*.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "*.py",
    "*.so",
    "*.pth.tar",
)


def _magic(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save, .keras, .npz)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    if head.startswith(b"GGUF"):
        return "a GGUF model"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return "a safetensors file"
    return None


def _by_name(name: str) -> str | None:
    if any(fnmatch.fnmatchcase(name, p) for p in _LOADER_NAMES):
        return "a name that model loaders look for"
    return None


def why_loadable(path: str, name: str, is_dir: bool) -> str | None:
    """Why a loader could pick up the entry ``name`` (its base name) at ``path``."""
    if is_dir:
        if _CHECKPOINT_DIR.match(name):
            return "a checkpoint-N folder, which a trainer resumes from"
        return None
    by_name = _by_name(name)
    if by_name is not None:
        return by_name
    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except OSError:
        return None
    try:
        head = os.read(fd, MAGIC_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    kind = _magic(head)
    return f"its content starts like {kind}" if kind else None


def findings(root: str, ignored: list[str], shown: str) -> list[Finding]:
    """TG510 for each ignored entry (relative names) that a loader could pick up."""
    out: list[Finding] = []
    budget = MAX_ENTRIES
    for rel in ignored:
        if len(out) >= MAX_FINDINGS or budget <= 0:
            break
        path = os.path.join(root, rel)
        pending = [(rel, path, 0)]
        while pending and budget > 0 and len(out) < MAX_FINDINGS:
            name, full, depth = pending.pop()
            budget -= 1
            try:
                st = os.lstat(full)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                # A loader follows links (Trainer's isdir, open): judge the link by
                # its name as a folder and as a file, and never follow it here.
                base = os.path.basename(name)
                why = why_loadable(full, base, True) or _by_name(base)
                if why is not None:
                    out.append(_finding(os.path.join(shown, name), name, f"{why} (a link)"))
                continue
            if not (is_dir or stat.S_ISREG(st.st_mode)):
                continue
            why = why_loadable(full, os.path.basename(name), is_dir)
            if why is not None:
                out.append(_finding(os.path.join(shown, name), name, why))
                continue
            if is_dir and depth < MAX_DEPTH:
                try:
                    with os.scandir(full) as it:
                        children = sorted(e.name for e in it)[:budget]
                except OSError:
                    continue
                pending += [(f"{name}/{c}", os.path.join(full, c), depth + 1) for c in children]
    return out


def _finding(file: str, name: str, why: str) -> Finding:
    return Finding(
        "TG510",
        rule("TG510").severity,
        f"ignored, but a loader could pick it up: {why}",
        file=file,
        evidence={"ignored_entry": name},
    )
