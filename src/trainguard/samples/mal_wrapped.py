"""Payloads inside other containers: numpy, joblib, compressors, archives."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from pathlib import Path

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import Reduce, malicious, py_touch
from trainguard.samples.mal_torch import torch_zip_with_payload

_NULLIFAI = (
    "https://www.reversinglabs.com/blog/rl-identifies-malware-ml-model-hosted-on-hugging-face"
)
_JOBLIB_METHODS = ("zlib", "gzip", "bz2", "lzma", "xz", "lz4")


def _exec_pickle(canary: Path, protocol: int = 4) -> bytes:
    return (
        PickleAsm(protocol)
        .proto(protocol)
        .call("builtins", "exec", py_touch(canary))
        .stop()
        .getvalue()
    )


# -- numpy ----------------------------------------------------------------------


def _object_array(canary: Path):  # type: ignore[no-untyped-def]
    import numpy as np

    arr = np.empty(2, dtype=object)
    arr[0] = "layer.weight"
    arr[1] = Reduce(exec, py_touch(canary))
    return arr


@malicious(
    "numpy-npy-object",
    ".npy object array whose pickle runs exec",
    "numpy.load(allow_pickle=True) unpickles object arrays",
    loader="numpy",
    requires=("numpy",),
)
def npy_object(out: Path, canary: Path) -> Path:
    import numpy as np

    path = out / "features.npy"
    np.save(path, _object_array(canary), allow_pickle=True)
    return path


@malicious(
    "numpy-npz-object",
    ".npz holding a clean array and a malicious object array",
    "the payload sits in one member of the zip numpy.savez writes",
    loader="numpy-npz",
    requires=("numpy",),
)
def npz_object(out: Path, canary: Path) -> Path:
    import numpy as np

    path = out / "arrays_meta.npz"
    np.savez(path, weights=np.arange(8, dtype=np.float32), meta=_object_array(canary))
    return path


# -- joblib ---------------------------------------------------------------------


def _joblib_payload(out: Path, canary: Path, method: str | None) -> Path:
    import joblib
    import numpy as np

    suffix = f".joblib.{method}" if method else ".joblib"
    path = out / f"model{suffix}"
    obj = {"coef": np.linspace(0.0, 1.0, 16), "hook": Reduce(exec, py_touch(canary))}
    joblib.dump(obj, path, compress=(method, 3) if method else 0)
    return path


@malicious(
    "joblib-uncompressed",
    "joblib.dump file with a payload next to a numpy array",
    "joblib's pickle with NumpyArrayWrapper records and raw array data",
    loader="joblib",
    requires=("joblib", "numpy"),
)
def joblib_plain(out: Path, canary: Path) -> Path:
    return _joblib_payload(out, canary, None)


def _register_joblib(method: str) -> None:
    requires = ("joblib", "numpy", "lz4") if method == "lz4" else ("joblib", "numpy")

    @malicious(
        f"joblib-{method}",
        f"joblib file compressed with {method}, with a payload",
        f"the whole joblib stream is {method}-compressed; a scanner must "
        "decompress before it sees any opcode",
        loader="joblib",
        requires=requires,
    )
    def build(out: Path, canary: Path) -> Path:
        return _joblib_payload(out, canary, method)


for _method in _JOBLIB_METHODS:
    _register_joblib(_method)


# -- compressed plain pickles -----------------------------------------------------


@malicious(
    "gzip-pickle",
    "gzip-compressed pickle with exec",
    "pickle.load(gzip.open(...)), a common cache format",
    loader="gzip-pickle",
)
def gzip_pickle(out: Path, canary: Path) -> Path:
    path = out / "model.pkl.gz"
    path.write_bytes(gzip.compress(_exec_pickle(canary), mtime=0))
    return path


@malicious(
    "bz2-pickle",
    "bz2-compressed pickle with exec",
    "pickle.load(bz2.open(...))",
    loader="bz2-pickle",
)
def bz2_pickle(out: Path, canary: Path) -> Path:
    path = out / "model.pkl.bz2"
    path.write_bytes(bz2.compress(_exec_pickle(canary)))
    return path


@malicious(
    "xz-pickle",
    "xz-compressed pickle with exec",
    "pickle.load(lzma.open(...))",
    loader="lzma-pickle",
)
def xz_pickle(out: Path, canary: Path) -> Path:
    path = out / "model.pkl.xz"
    path.write_bytes(lzma.compress(_exec_pickle(canary)))
    return path


# -- archives holding a checkpoint ------------------------------------------------


@malicious(
    "tar-with-pt",
    "tar.gz holding a malicious PyTorch checkpoint",
    "the checkpoint is one member of a compressed tarball",
    loader="tar-torch",
)
def tar_with_pt(out: Path, canary: Path) -> Path:
    path = out / "release.tar.gz"
    members = {
        "release/model.pt": torch_zip_with_payload(canary),
        "release/README.txt": b"weights for the release\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@malicious(
    "zip-with-pt",
    "zip holding a malicious PyTorch checkpoint",
    "a deflated outer zip whose member is itself a torch zip",
    loader="zip-torch",
)
def zip_with_pt(out: Path, canary: Path) -> Path:
    path = out / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("checkpoints/model.pt", torch_zip_with_payload(canary))
        zf.writestr("README.txt", "weights\n")
    return path


@malicious(
    "7z-with-pt",
    "nullifAI: a .pt pickle packed with 7z, stream broken after the payload",
    "7z instead of zip hides the pickle from zip-only scanners, and the "
    "broken tail makes the rest of the stream unparseable",
    advisory=_NULLIFAI,
    loader="7z-pickle",
    requires=("py7zr",),
)
def sevenz_with_pt(out: Path, canary: Path) -> Path:
    import py7zr

    a = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary)).pop()
    a.empty_dict().str_("state_dict").raw(b"\xfe\xfe")  # not opcodes: loading fails here
    path = out / "model.7z"
    with py7zr.SevenZipFile(path, "w") as archive:
        archive.writestr(a.getvalue(), "model/pytorch_model.pt")
    return path
