"""Where a mutant's pickle travels, and the loader that finds it there.

Each container writes the pickle bytes into a file and names the
:data:`~trainguard.samples.loaders.LOADERS` entry a victim would call on it.
:func:`draw` composes a random mutant from every axis; :func:`mutant` builds
one named combination (for replaying a failure).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainguard.samples.base import Sample
from trainguard.samples.mutations import (
    ACCESS,
    CALLS,
    FRAMING,
    TAILS,
    TARGETS,
    Encoding,
    sample_for,
    valid,
)
from trainguard.samples.zipwriter import torch_members, write_zip

Wrap = Callable[[bytes, Path], Path]

# numpy's header parser builds an object dtype from each of these spellings.
_OBJECT_DESCRS = ("'|O'", "'O'", "'object'", "'O8'", "[('a', '|O')]", "('|O', (1,))")


@dataclass(frozen=True)
class Container:
    loader: str
    wrap: Wrap
    requires: tuple[str, ...] = ()


def _raw(data: bytes, folder: Path) -> Path:
    path = folder / "model.pkl"
    path.write_bytes(data)
    return path


def _torch_zip(data: bytes, folder: Path) -> Path:
    return write_zip(folder / "model.pt", torch_members(data))


def _legacy(data: bytes, folder: Path) -> Path:
    path = folder / "model.pt"
    path.write_bytes(data)  # torch.load's legacy path unpickles the first pickle as is
    return path


def _tar(members: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _legacy_tar(data: bytes, folder: Path) -> Path:
    # torch.load reads a tar's "storages" member first: its first pickle runs.
    return _tar({"storages": data, "tensors": b"", "pickle": b""}, folder / "model.pt")


def _joblib(compress: Callable[[bytes], bytes]) -> Wrap:
    def wrap(data: bytes, folder: Path) -> Path:
        path = folder / "model.joblib"
        path.write_bytes(compress(data))
        return path

    return wrap


def _zfile(data: bytes) -> bytes:
    # joblib < 0.10's format (numpy_pickle_compat.write_zfile), still read by joblib.load.
    return b"ZF" + hex(len(data)).encode().ljust(19) + zlib.compress(data)


def _npy(data: bytes, folder: Path) -> Path:
    descr = random.Random(len(data)).choice(_OBJECT_DESCRS)
    text = f"{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    path = folder / "array.npy"
    header = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()
    path.write_bytes(header + data)
    return path


def _gzip(data: bytes, folder: Path) -> Path:
    path = folder / "model.pkl.gz"
    path.write_bytes(gzip.compress(data))
    return path


def _tar_of_legacy(data: bytes, folder: Path) -> Path:
    return _tar({"ckpt/model.pt": data}, folder / "bundle.tar")


def _zip_of_legacy(data: bytes, folder: Path) -> Path:
    path = folder / "bundle.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ckpt/model.pt", data)
    return path


def _nested(data: bytes, folder: Path) -> Path:
    # An honest-looking outer pickle (protocol 4: bytes as BINBYTES) carrying the
    # payload as a byte string its reader unpickles later.
    outer = b"\x80\x04}\x94(\x8c\x04step\x94K\x07\x8c\x05state\x94B"
    outer += len(data).to_bytes(4, "little") + data + b"\x94u."
    path = folder / "run_state.pkl"
    path.write_bytes(outer)
    return path


CONTAINERS: dict[str, Container] = {
    "raw": Container("pickle", _raw),
    "torch-zip": Container("torch", _torch_zip, ("torch",)),
    "legacy-torch": Container("torch", _legacy, ("torch",)),
    "legacy-torch-tar": Container("torch", _legacy_tar, ("torch",)),
    "joblib-zlib": Container("joblib", _joblib(zlib.compress)),
    "joblib-gzip": Container("joblib", _joblib(gzip.compress)),
    "joblib-bz2": Container("joblib", _joblib(bz2.compress)),
    "joblib-lzma": Container(
        "joblib", _joblib(lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE))
    ),
    "joblib-xz": Container("joblib", _joblib(lzma.compress)),
    "joblib-zfile": Container("joblib", _joblib(_zfile)),
    "npy-object": Container("numpy", _npy, ("numpy",)),
    "gzip": Container("gzip-pickle", _gzip),
    "tar": Container("tar-torch", _tar_of_legacy, ("torch",)),
    "zip": Container("zip-torch", _zip_of_legacy, ("torch",)),
    "nested": Container("pickle-nested", _nested),
}


def mutant(target: str, access: str, call: str, enc: Encoding, container: str) -> Sample:
    c = CONTAINERS[container]
    return sample_for(target, access, call, enc, container, c.loader, c.wrap, c.requires)


def draw(rng: random.Random) -> Sample:
    """One random valid mutant."""
    while True:
        target = rng.choice(sorted(TARGETS))
        access = rng.choice(ACCESS)
        call = rng.choice(CALLS)
        if valid(target, access, call):
            break
    enc = Encoding(rng.randrange(6), rng.choice(FRAMING), rng.choice(TAILS))
    return mutant(target, access, call, enc, rng.choice(sorted(CONTAINERS)))


def parse_id(ident: str) -> Sample:
    """The mutant named by ``ident`` (as printed by a failing test)."""
    body = ident.removeprefix("mut-")
    for target in sorted(TARGETS, key=len, reverse=True):
        if body.startswith(target + "-"):
            rest = body[len(target) + 1 :].split("-")
            break
    else:
        raise ValueError(f"unknown target in {ident!r}")
    access, call, proto, framing, tail = rest[:5]
    container = "-".join(rest[5:])
    # framing names contain "_" only, so the split above is unambiguous
    enc = Encoding(int(proto.removeprefix("p")), framing, tail)
    return mutant(target, access, call, enc, container)
