"""``trainguard data seal/verify`` and ``SealedDataset``: every format splits into samples,
an honest read matches the source, a changed sample is named by index, shard and rank, a
manifest edited after signing fails, and garbage shards are findings, not crashes."""

from __future__ import annotations

import base64
import json
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from trainguard.cli.main import main
from trainguard.data import formats
from trainguard.data.seal import (
    DataVerificationError,
    default_signature,
    leaves_path,
    seal_dataset,
    verify_dataset,
    verify_report,
)
from trainguard.data.sealed import SampleError, SealedDataset
from trainguard.signing.errors import VerificationError
from trainguard.signing.keys import write_keypair

DTYPES = [np.float32, np.float64, np.int64, np.uint8, np.bool_, np.float16]


def _shard(rnd: random.Random, data: Path, k: int) -> list[Any]:
    """Writes one random shard; returns its samples as the reader must give them back."""
    kind = rnd.choice(["npy", "torch-tuple", "torch-dict", "torch-tensor", "jsonl", "file"])
    n = rnd.randint(1, 7)
    g = np.random.default_rng(rnd.randrange(2**32))
    if kind == "npy":
        shape = (n, *[rnd.randint(1, 3) for _ in range(rnd.randint(0, 2))])
        arr: Any = (g.standard_normal(shape) * 10).astype(rnd.choice(DTYPES))
        np.save(data / f"s{k}.npy", arr)
        return list(arr)
    if kind.startswith("torch"):
        x = torch.from_numpy(g.standard_normal((n, 3)).astype(np.float32))
        y = torch.from_numpy(g.integers(0, 5, n))
        content: Any = {"tuple": (x, y), "dict": {"x": x, "y": y}, "tensor": x}[kind[6:]]
        torch.save(content, data / f"s{k}.pt")
        if kind == "torch-tensor":
            return [x[i] for i in range(n)]
        if kind == "torch-dict":
            return [{"x": x[i], "y": y[i]} for i in range(n)]
        return [(x[i], y[i]) for i in range(n)]
    if kind == "jsonl":
        rows = [
            {"text": secrets.token_hex(rnd.randint(1, 8)), "label": rnd.randint(0, 3)}
            for _ in range(n)
        ]
        (data / f"s{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows
    sub = data / f"files{k}"
    sub.mkdir()
    blob = secrets.token_bytes(rnd.randint(0, 64))
    (sub / "x.bin").write_bytes(blob)
    return [blob]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray | np.generic):
        return a.tobytes() == np.asarray(b).tobytes() and a.dtype == np.asarray(b).dtype
    return bool(a == b)


def _dataset(tmp_path: Path, rnd: random.Random) -> tuple[Path, Path, Path, list[Any]]:
    data = tmp_path / "data"
    data.mkdir()
    expected: dict[str, list[Any]] = {}
    for k in range(rnd.randint(1, 5)):
        before = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
        samples = _shard(rnd, data, k)
        (name,) = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()} - before
        expected[name] = samples
    private, public = write_keypair(tmp_path / "signer")
    seal_dataset([data], private)
    ordered = [s for name in sorted(expected) for s in expected[name]]
    return data, private, public, ordered


def _rewrite(path: Path, record: int) -> None:
    """Change one sample (``record``) of a shard, in its own format."""
    fmt = formats.format_of(path.name).name
    if fmt == "npy":
        arr = np.load(path)
        flat = arr.reshape(len(arr), -1)
        flat[record, 0] = ~flat[record, 0] if arr.dtype == np.bool_ else flat[record, 0] + 1
        np.save(path, flat.reshape(arr.shape))
    elif fmt == "torch":
        content = torch.load(path, weights_only=True)
        first = content if isinstance(content, torch.Tensor) else (
            content["y"] if isinstance(content, dict) else content[1]
        )  # fmt: skip
        first[record] += 1  # a relabel (y), or a poisoned input (a lone tensor)
        torch.save(content, path)
    elif fmt == "jsonl":
        lines = path.read_text().splitlines()
        row = json.loads(lines[record])
        row["label"] += 1
        lines[record] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_bytes(path.read_bytes() + b"!")


def test_honest_reads_match_and_a_changed_sample_is_named(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    data, _, public, expected = _dataset(tmp_path, rnd)
    assert verify_dataset(data, public).ok
    ds = SealedDataset(data, public, rank=3)
    assert len(ds) == len(expected)
    for i, want in enumerate(expected):
        assert _same(want, ds[i]), (seed, i)
    with pytest.raises(IndexError):
        ds[len(ds)]
    # One sample changes on disk after the seal.
    target = rnd.randrange(len(ds))
    k, record = ds.manifest.locate(target)
    shard = ds.manifest.shards[k].name
    _rewrite(data / shard, record)
    found = verify_report(data, public).findings
    assert [(f.rule, f.evidence.get("sample")) for f in found] == [("TG1520", str(target))], (
        seed,
        found,
    )
    fresh = SealedDataset(data, public, rank=3)
    with pytest.raises(SampleError) as caught:
        fresh[target]
    err = caught.value
    assert (err.index, err.shard, err.record, err.rank) == (target, shard, record, 3)
    assert f"sample {target} (shard {shard} #{record}), read by rank 3" in str(err)
    for i in rnd.sample(range(len(ds)), min(5, len(ds))):
        if i != target:
            assert _same(expected[i], fresh[i]), (seed, i)
    survey = SealedDataset(data, public, on_mismatch="record")
    survey[target]
    assert [f.rule for f in survey.findings] == ["TG1520"]


def _edit_payload(sig: Path, edit: Any) -> None:
    bundle = json.loads(sig.read_text())
    env = bundle["dsseEnvelope"]
    statement = json.loads(base64.b64decode(env["payload"]))
    edit(statement)
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))


def test_a_manifest_edited_after_signing_fails(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    data, _, public, _ = _dataset(tmp_path, rnd)
    sig = default_signature(data)
    original = sig.read_bytes()

    def bump(statement: dict[str, Any]) -> None:
        statement["predicate"]["shards"][0]["samples"] += 1

    _edit_payload(sig, bump)
    found = verify_report(data, public).findings
    assert [f.rule for f in found] == ["TG501"]
    with pytest.raises(VerificationError):
        SealedDataset(data, public)
    sig.write_bytes(original)
    leaves = leaves_path(sig)
    raw = bytearray(leaves.read_bytes())
    raw[rnd.randrange(len(formats_magic()), len(raw))] ^= 1
    leaves.write_bytes(bytes(raw))
    assert [f.rule for f in verify_report(data, public).findings] == ["TG1522"]
    _, other_public = write_keypair(tmp_path / "other")
    assert [f.rule for f in verify_report(data, other_public).findings] == ["TG501"]


def formats_magic() -> bytes:
    from trainguard.data.manifest import LEAVES_MAGIC

    return LEAVES_MAGIC


GARBAGE = {
    "npy": [
        b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4', 'shape': (9999999999,), }" + b" " * 8,
        b"\x93NUMPY\x01\x00" + (60000).to_bytes(2, "little") + b"{" * 100,
        b"\x93NUMPY\x01\x00\x46\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
        + b" " * 14,
        b"not numpy at all",
    ],
    "pt": [b"PK\x03\x04garbage", b"\x80\x04garbage", b""],
    "jsonl": [b'{"a": 1}\n\xff\xfe{not json\n'],
}


def test_garbage_shards_are_findings_not_crashes(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "good.npy", np.zeros((3, 2), np.float32))
    suffix = rnd.choice(["npy", "pt"])
    (data / f"bad.{suffix}").write_bytes(
        rnd.choice(GARBAGE[suffix]) + secrets.token_bytes(rnd.randint(0, 32))
    )
    private, public = write_keypair(tmp_path / "signer")
    with pytest.raises(DataVerificationError) as caught:
        seal_dataset([data], private)
    assert [(f.rule, f.file) for f in caught.value.findings] == [("TG1522", f"bad.{suffix}")]
    assert not default_signature(data).exists()  # nothing sealed
    # Sealed honest, then a shard turns to garbage: verify and reads say so, by name.
    (data / f"bad.{suffix}").unlink()
    seal_dataset([data], private)
    (data / "good.npy").write_bytes(rnd.choice(GARBAGE["npy"]))
    found = verify_report(data, public).findings
    assert [(f.rule, f.file) for f in found] == [("TG1522", "good.npy")]
    with pytest.raises(SampleError) as read:
        SealedDataset(data, public)[rnd.randrange(3)]
    assert "cannot be read" in str(read.value) and read.value.shard == "good.npy"


def test_a_jsonl_line_over_the_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "MAX_JSONL_LINE", 64)
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'"' + b"x" * 200 + b'"\n')
    with pytest.raises(formats.ShardError, match="line 2 is over 64 bytes"):
        formats.sample_digests(str(path), formats.BY_NAME["jsonl"])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "a.npy", np.arange(12, dtype=np.int64).reshape(6, 2))
    (data / "b.jsonl").write_text('{"t": 1}\n{"t": 2}\n')
    private, public = write_keypair(tmp_path / "k")
    assert main(["data", "seal", str(data), "--key", str(private), "--no-progress"]) == 0
    assert "sealed 2 shard(s), 8 samples" in capsys.readouterr().err
    assert main(["data", "verify", str(data), "--key", str(public), "--no-progress"]) == 0
    capsys.readouterr()
    arr = np.load(data / "a.npy")
    arr[4, 1] = -1
    np.save(data / "a.npy", arr)
    assert main(["data", "verify", str(data), "--key", str(public), "-f", "json"]) == 1
    out = capsys.readouterr().out
    assert "TG1520" in out and "sample 4 (shard a.npy #4)" in out
    (data / "junk.npy").write_bytes(b"junk")
    assert main(["data", "seal", str(data), "--key", str(private), "--signature",
                 str(tmp_path / "x.sig")]) == 1  # fmt: skip
    assert "TG1522" in capsys.readouterr().out
