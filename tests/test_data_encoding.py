"""A sample's digest is over its values and the container training gets back, not over how
a file spells them (red team: a .npy re-written big-endian, or with its dtype spelled
``float32`` instead of ``<f4``, was TG1520 on every row; a torch shard re-saved as a dict
instead of a tuple passed SealedDataset and handed training another type)."""

from __future__ import annotations

import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from trainguard.data.seal import seal_dataset, verify_report
from trainguard.data.sealed import SampleError, SealedDataset
from trainguard.findings import Severity
from trainguard.signing.keys import write_keypair

DTYPES = ["f4", "f8", "f2", "i2", "i4", "i8", "u2", "u4", "c8", "u1", "b1", "U3"]


def _npy(path: Path, descr: str, shape: tuple[int, ...], data: bytes) -> None:
    """An .npy file with this exact header text (numpy would spell descr its own way)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape})
    pad = 64 - (10 + len(header) + 1) % 64
    text = (header + " " * pad + "\n").encode("latin1")
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data)


def _resolves(name: str, dtype: Any) -> bool:
    try:
        return bool(np.dtype(name) == dtype)
    except TypeError:
        return False


def _array(rnd: random.Random, code: str) -> Any:
    g = np.random.default_rng(rnd.randrange(2**32))
    shape = (rnd.randint(1, 6), *[rnd.randint(1, 3) for _ in range(rnd.randint(0, 2))])
    if code == "U3":
        return np.array(g.choice(["ab", "xyz", "q"], size=shape), dtype="<U3")
    return (g.standard_normal(shape) * 50).astype("<" + code if code != "b1" else "?")


def test_the_same_values_spelled_otherwise_are_the_same_samples(tmp_path: Path) -> None:
    """Generative: random arrays of random dtypes, sealed as numpy writes them, then written
    again with the dtype spelled another way (big-endian, numpy's name, '=' native): no
    sample is reported changed, SealedDataset gives the same values; only the file's bytes
    may differ (TG1522 says every sample matches).  A real change is still TG1520."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    private, public = write_keypair(tmp_path / "signer")
    for trial in range(12):
        data = tmp_path / f"d{trial}"
        data.mkdir()
        arr = _array(rnd, rnd.choice(DTYPES))
        np.save(data / "x.npy", arr)
        seal_dataset([data], private)
        how = rnd.choice(["big-endian", "name", "native"])
        if how == "big-endian":
            other = arr.astype(arr.dtype.newbyteorder(">"))
            _npy(data / "x.npy", other.dtype.str, arr.shape, other.tobytes())
        elif how == "name":
            names = [arr.dtype.name, arr.dtype.str[1:]]  # 'float32'; 'U3' ('str96' is none)
            name = next(n for n in names if _resolves(n, arr.dtype))
            _npy(data / "x.npy", name, arr.shape, arr.tobytes())
        else:
            _npy(data / "x.npy", "=" + arr.dtype.str[1:], arr.shape, arr.tobytes())
        context = (trial, how, arr.dtype.str, arr.shape)
        found = verify_report(data, public).findings
        assert [f.rule for f in found if f.rule == "TG1520"] == [], (context, found)
        assert all(
            "every sample matches" in f.message and f.severity == Severity.MEDIUM for f in found
        ), (context, found)
        ds = SealedDataset(data, public)
        for i in range(len(arr)):
            assert np.array_equal(ds[i], arr[i]) and ds[i].dtype == arr.dtype, context
        flat = arr.reshape(len(arr), -1)
        row = rnd.randrange(len(arr))
        if arr.dtype == np.bool_:
            flat[row, 0] = ~flat[row, 0]
        elif arr.dtype.kind == "U":
            flat[row, 0] = "zz" if flat[row, 0] != "zz" else "ab"
        else:
            flat[row, 0] += 1
        np.save(data / "x.npy", flat.reshape(arr.shape).astype(arr.dtype.newbyteorder(">")))
        found = verify_report(data, public).findings
        assert [f.evidence.get("sample") for f in found if f.rule == "TG1520"] == [str(row)], (
            context, found)  # fmt: skip


def test_a_torch_shard_re_saved_in_another_layout_is_another_sample(tmp_path: Path) -> None:
    """Generative: a torch shard sealed as a tuple, list, dict or lone tensor, re-saved in
    another layout with the same tensors: every row is TG1520 and SealedDataset refuses it
    (training would get another type); re-saved in the same layout from a view of a larger
    storage (other bytes), every sample matches."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    print(f"seed {seed}")
    private, public = write_keypair(tmp_path / "signer")
    layouts = {
        "tuple": lambda x, y: (x, y),
        "list": lambda x, y: [x, y],
        "dict": lambda x, y: {"0": x, "1": y},
    }
    for trial in range(6):
        data = tmp_path / f"d{trial}"
        data.mkdir()
        n = rnd.randint(1, 6)
        x, y = torch.randn(n, 3), torch.randint(0, 5, (n,))
        sealed, other = rnd.sample(sorted(layouts), 2)
        torch.save(layouts[sealed](x, y), data / "s.pt")
        seal_dataset([data], private)
        big = torch.zeros(n + 2, 3)
        big[1 : n + 1] = x
        torch.save(layouts[sealed](big[1 : n + 1], y), data / "s.pt")
        found = verify_report(data, public).findings
        assert all(f.rule == "TG1522" and "every sample matches" in f.message for f in found), (
            trial, sealed, found)  # fmt: skip
        torch.save(layouts[other](x, y), data / "s.pt")
        found = verify_report(data, public).findings
        changed = sorted(int(f.evidence["sample"]) for f in found if f.rule == "TG1520")
        assert changed == list(range(n)), (trial, sealed, other, found)
        with pytest.raises(SampleError):
            SealedDataset(data, public)[rnd.randrange(n)]
