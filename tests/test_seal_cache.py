"""The digest cache: reused for unchanged files, never for changed ones.

Reuse is proven by what was hashed (``HashStats``), not by timing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from trainguard import filestate
from trainguard.digest_cache import default_cache_path
from trainguard.filestate import Identity
from trainguard.signing import DigestCache, VerificationError, seal, verify
from trainguard.signing.errors import SealError
from trainguard.signing.fstrust import FilesystemTrust
from trainguard.signing.hashing import Piece, hash_piece
from trainguard.signing.keys import write_keypair

MiB = 1024 * 1024


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    why = FilesystemTrust().why_not(root.stat().st_dev)
    if why is not None:  # e.g. a container's overlay root: the cache is rightly off there
        pytest.skip(f"the digest cache is not used on this test folder's filesystem: {why}")
    for i in range(4):
        (root / f"part-{i}.bin").write_bytes(os.urandom(MiB + i))
    return root


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DigestCache:
    # No racy window: the files were written a moment ago (the default window,
    # tested below, keeps such digests out of the cache).
    monkeypatch.setattr(filestate, "RACY_NS", 0)
    return DigestCache(tmp_path / "cache" / "model.json")


def total(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir() if p.name != "model.sig")


def test_unchanged_files_are_not_hashed_again(
    model: Path, keys: tuple[Path, Path], cache: DigestCache
) -> None:
    first = seal(model, keys[0], cache=cache)
    assert first.stats.bytes_hashed == total(model) and first.stats.files_from_cache == 0
    ok = verify(model, keys[1], cache=cache)
    assert ok.stats.bytes_hashed == 0 and ok.stats.files_from_cache == 4
    (model / "part-2.bin").write_bytes(os.urandom(100))
    again = seal(model, keys[0], cache=cache)
    assert again.stats.bytes_hashed == 100 and again.stats.files_from_cache == 3
    full = verify(model, keys[1], cache=cache, full=True)
    assert full.stats.bytes_hashed == total(model)


def test_shard_digests_are_cached_per_shard_size(
    model: Path, keys: tuple[Path, Path], cache: DigestCache
) -> None:
    seal(model, keys[0], cache=cache, shard_size=256 * 1024)
    assert verify(model, keys[1], cache=cache).stats.bytes_hashed == 0
    # Another shard size (or algorithm) is another cache entry.
    assert seal(model, keys[0], cache=cache, shard_size=512 * 1024).stats.bytes_hashed > 0
    assert seal(model, keys[0], cache=cache, hash="blake3").stats.files_from_cache == 0


def test_same_size_same_mtime_change_is_still_caught(
    model: Path, keys: tuple[Path, Path], cache: DigestCache
) -> None:
    seal(model, keys[0], cache=cache)
    target = model / "part-1.bin"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    # The attacker puts the mtime back; the kernel still moved the ctime.
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(VerificationError) as err:
        verify(model, keys[1], cache=cache)
    assert [f.rule for f in err.value.findings] == ["TG503"]


def test_replaced_file_with_same_stat_fields_is_caught(
    model: Path, keys: tuple[Path, Path], cache: DigestCache
) -> None:
    seal(model, keys[0], cache=cache)
    target = model / "part-0.bin"
    before = target.stat()
    fresh = model / "swap.tmp"
    fresh.write_bytes(os.urandom(before.st_size))
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
    fresh.replace(target)  # new inode
    with pytest.raises(VerificationError):
        verify(model, keys[1], cache=cache)


def test_recently_changed_files_are_not_cached(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    racy = DigestCache(tmp_path / "racy.json")  # default window
    seal(model, keys[0], cache=racy)
    assert verify(model, keys[1], cache=racy).stats.files_from_cache == 0
    old = time.time_ns() - filestate.RACY_NS - 1_000_000_000
    assert not racy.put(
        "/x", Identity(1, 2, 3, old, time.time_ns()), "sha256", 0, [b"x" * 32], time.time_ns()
    )
    assert racy.put("/x", Identity(1, 2, 3, old, old), "sha256", 0, [b"x" * 32], time.time_ns())


def test_default_cache_lives_outside_the_model(
    model: Path, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(filestate, "RACY_NS", 0)
    seal(model, keys[0])
    path = Path(default_cache_path("model", [str(model.resolve())]))
    assert path.parent == tmp_path / "xdg" / "trainguard"
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert verify(model, keys[1]).stats.files_from_cache == 4
    assert sorted(p.name for p in model.iterdir()) == [
        "model.sig",
        "part-0.bin",
        "part-1.bin",
        "part-2.bin",
        "part-3.bin",
    ]


def test_broken_cache_is_switched_off_not_trusted(
    model: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"this is not a cache" * 100)
    bad.chmod(0o600)
    result = seal(model, keys[0], cache=DigestCache(bad))
    assert result.notes and "not usable" in result.notes[0]
    assert result.stats.bytes_hashed == total(model)
    verify(model, keys[1], cache=DigestCache(bad))


def test_file_changed_while_hashing_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    ident = Identity.of(path.stat())
    path.write_bytes(b"b" * 101)
    with pytest.raises(SealError, match="changed"):
        hash_piece(Piece(str(path), 0, 100, ident), "sha256")


@pytest.mark.parametrize("algorithm", ["sha256", "blake3", "blake2b"])
def test_mapped_and_read_windows_give_the_library_digest(tmp_path: Path, algorithm: str) -> None:
    import hashlib

    import blake3

    data = os.urandom(3 * MiB + 12345)
    path = tmp_path / "f"
    path.write_bytes(data)
    ident = Identity.of(path.stat())
    whole = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "blake3": blake3.blake3}
    # Windows that are not page multiples and a piece that starts mid-page.
    for start, end, window in ((0, len(data), MiB + 3), (4097, 2 * MiB + 5, MiB), (7, 300, MiB)):
        got = hash_piece(Piece(str(path), start, end, ident), algorithm, window)
        assert got == whole[algorithm](data[start:end]).digest()


def test_one_worker_count_from_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hashing for seal and for env verify sizes its pool from the CPU affinity (a job
    pinned to 3 of 64 cores gets 3 threads), capped, and at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
    assert filestate.default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)), raising=False)
    assert filestate.default_workers() == filestate.MAX_WORKERS
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert filestate.default_workers() == 1
