"""Verification hashes only what can change the verdict: bounded whatever is planted.

Proven by what was hashed (``stats`` and the pieces handed to the hasher),
never by timing: an unlisted sparse file of 16 TiB (or the largest this
filesystem allows) must not be read at all.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from trainguard.filestate import Entry, Identity
from trainguard.signing import build, seal, verify_report
from trainguard.signing.bounds import ALWAYS_HASH_UP_TO, RENAME_PROBE_MAX, plan
from trainguard.signing.hashing import Piece
from trainguard.signing.keys import write_keypair
from trainguard.signing.manifest import Manifest, Resource, Serialization

BIG = 3 * ALWAYS_HASH_UP_TO  # above the always-hash size


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "weights.bin").write_bytes(os.urandom(BIG))
    return root


@pytest.fixture()
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths every verification hands to the hasher."""
    seen: list[str] = []
    real = build.hash_pieces

    def spy(pieces: list[Piece], *args: object, **kw: object) -> list[bytes]:
        seen.extend(p.path for p in pieces)
        return real(pieces, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(build, "hash_pieces", spy)
    return seen


def sparse(path: Path) -> int:
    """A sparse file of 16 TiB, or the largest this filesystem takes (ext4: 16 TiB - 4 KiB)."""
    with open(path, "wb") as fh:
        for size in (16 << 40, (16 << 40) - (64 << 10), 8 << 40, 1 << 40, 64 << 30, 8 << 30):
            try:
                fh.truncate(size)
                return size
            except OSError:
                continue
    pytest.skip("this filesystem takes no large sparse file")


@pytest.mark.parametrize("shard_size", [None, 1 << 20])
def test_unlisted_sparse_file_is_reported_without_reading_it(
    model: Path, keys: tuple[Path, Path], hashed: list[str], shard_size: int | None
) -> None:
    seal(model, keys[0], shard_size=shard_size)
    hashed.clear()
    huge = model / "huge.bin"
    size = sparse(huge)
    result = verify_report(model, keys[1], cache=False)
    assert str(huge) not in hashed
    assert result.stats.bytes_hashed == BIG + 2  # the sealed files only
    [finding] = result.report.findings
    assert (finding.rule, finding.file) == ("TG504", str(huge))
    assert finding.evidence["actual_size"] == str(size) and "not hashed" in finding.message


def test_listed_file_grown_sparse_is_modified_without_reading_it(
    model: Path, keys: tuple[Path, Path], hashed: list[str]
) -> None:
    seal(model, keys[0])
    hashed.clear()
    target = model / "weights.bin"
    with open(target, "r+b") as fh:
        fh.truncate(1 << 40)
    result = verify_report(model, keys[1], cache=False)
    assert str(target) not in hashed
    [finding] = result.report.findings
    assert finding.rule == "TG503" and finding.evidence["expected_size"] == str(BIG)


def test_a_renamed_large_file_is_still_recognised(
    model: Path, keys: tuple[Path, Path], hashed: list[str]
) -> None:
    seal(model, keys[0])
    hashed.clear()
    (model / "weights.bin").rename(model / "other.bin")
    sparse(model / "huge.bin")
    result = verify_report(model, keys[1], cache=False)
    assert str(model / "other.bin") in hashed and str(model / "huge.bin") not in hashed
    rules = sorted((f.rule, Path(f.file).name) for f in result.report.findings)
    assert rules == [("TG504", "huge.bin"), ("TG506", "other.bin")]


def test_planted_copies_of_a_missing_size_cost_one_hash(
    model: Path, keys: tuple[Path, Path], hashed: list[str]
) -> None:
    seal(model, keys[0])
    hashed.clear()
    (model / "weights.bin").unlink()
    for i in range(6):
        with open(model / f"decoy-{i}.bin", "wb") as fh:
            fh.truncate(BIG)  # the missing file's size: a rename candidate
    result = verify_report(model, keys[1], cache=False)
    assert sum("decoy" in p for p in hashed) == 1
    rules = sorted(f.rule for f in result.report.findings)
    assert rules == ["TG504"] * 6 + ["TG505"]


def _entry(size: int) -> Entry:
    return Entry("/x", Identity(1, size, size, 0, 0), True, False)


def test_plan_without_sealed_sizes_probes_only_up_to_the_cap() -> None:
    # model-signing's manifests record no sizes: a missing file may be any size.
    ser = Serialization("files", "sha256")
    manifest = Manifest("m", ser, [Resource("gone.bin", b"\0" * 32), Resource("kept", b"\1" * 32)])
    files = {"kept": _entry(1 << 41), "new.bin": _entry(5 << 30), "vast.bin": _entry(1 << 44)}
    shown = {n: n for n in [*files, "gone.bin"]}
    todo = plan(files, manifest, shown)
    # A listed file is hashed whatever its size: nothing else can verify it.
    assert set(todo.hash) == {"kept", "new.bin"}
    assert [(f.rule, f.file) for f in todo.findings] == [("TG504", "vast.bin")]
    assert (1 << 44) > RENAME_PROBE_MAX
    # Nothing missing: no unlisted file above the always-hash size is read.
    complete = Manifest("m", ser, [Resource("kept", b"\1" * 32)])
    assert set(plan(files, complete, shown).hash) == {"kept"}


def test_random_tampering_is_named_exactly_and_huge_files_are_never_read(
    tmp_path: Path, keys: tuple[Path, Path], hashed: list[str]
) -> None:
    """Random compositions of edits; each file's finding is what its edit implies."""
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    root = tmp_path / "model"
    root.mkdir()
    sizes = rng.sample(range(10, 4 * ALWAYS_HASH_UP_TO, 97), 8)  # distinct, spaced
    for i, size in enumerate(sizes):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(size))
    seal(root, keys[0], shard_size=rng.choice([None, 1 << 20]))
    hashed.clear()
    expected: set[tuple[str, str]] = set()
    ops = ["same-size", "grow", "delete", "rename", "keep"]
    for i in range(len(sizes)):
        path, op = root / f"f{i}.bin", rng.choice(ops)
        if op == "same-size":
            data = bytearray(path.read_bytes())
            data[rng.randrange(len(data))] ^= 0xFF
            path.write_bytes(bytes(data))
            expected.add(("TG503", path.name))
        elif op == "grow":
            with open(path, "ab") as fh:
                fh.write(b"+")
            expected.add(("TG503", path.name))
        elif op == "delete":
            path.unlink()
            expected.add(("TG505", path.name))
        elif op == "rename":
            path.rename(root / f"moved-{i}.bin")
            expected.add(("TG506", f"moved-{i}.bin"))
    huge = [root / f"huge-{i}.bin" for i in range(rng.randint(0, 2))]
    for h in huge:
        sparse(h)
        expected.add(("TG504", h.name))
    small = root / "planted.py"
    if rng.random() < 0.5:
        small.write_bytes(b"x" * 5)  # a size no sealed file has
        expected.add(("TG504", small.name))
    report = verify_report(root, keys[1], cache=False).report
    got = {(f.rule, Path(f.file).name) for f in report.findings}
    assert got == expected, f"seed {seed}"
    assert not any("huge" in p for p in hashed), f"seed {seed}"


def test_a_grown_file_whose_content_moved_is_a_rename_and_a_modification(
    model: Path, keys: tuple[Path, Path]
) -> None:
    seal(model, keys[0])
    weights = model / "weights.bin"
    weights.rename(model / "moved.bin")
    with open(weights, "wb") as fh:
        fh.truncate(1 << 40)  # a different size at the old name: judged by size
    findings = verify_report(model, keys[1], cache=False).report.findings
    got = sorted((f.rule, Path(f.file).name) for f in findings)
    assert got == [("TG503", "weights.bin"), ("TG506", "moved.bin")]
