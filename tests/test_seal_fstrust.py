"""The digest cache is used only where the filesystem's stat vouches for the content.

On tmpfs a write through a shared memory mapping leaves size, mtime and ctime
as they were (no writeback, so no page_mkwrite timestamp update): a cached
digest would pass the changed file.  Verification must hash such files afresh
and say why.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from trainguard import filestate
from trainguard.digest_cache import DigestCache
from trainguard.signing import VerificationError, seal, verify, verify_report
from trainguard.signing import build as build_module
from trainguard.signing.fstrust import FilesystemTrust, Mount, read_mounts
from trainguard.signing.keys import write_keypair

SHM = Path("/dev/shm")


def _on_tmpfs(path: Path) -> bool:
    trust = FilesystemTrust()
    why = trust.why_not(path.stat().st_dev)
    return why is not None and why.startswith("tmpfs")


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "key")


@pytest.fixture()
def shm_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not SHM.is_dir() or not _on_tmpfs(SHM):
        pytest.skip("no tmpfs at /dev/shm")
    root = SHM / f"tg-fstrust-{os.getpid()}-{tmp_path.name}"
    root.mkdir()
    (root / "weights.bin").write_bytes(bytes(range(256)) * 64)
    yield root
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()


def _write_through_mapping(path: Path) -> None:
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mapped:
        mapped[100] ^= 0xFF
        mapped.flush()


class _TrustEverything(FilesystemTrust):
    def __init__(self) -> None:
        super().__init__({})

    def why_not(self, dev: int) -> str | None:
        return None


def test_cached_verify_never_passes_a_mapped_write_on_tmpfs(
    shm_model: Path, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filestate, "RACY_NS", 0)  # as if sealed long ago
    cache = DigestCache(tmp_path / "cache.json")
    sealed = seal(shm_model, keys[0], cache=cache)
    assert any("tmpfs" in n for n in sealed.notes)
    target = shm_model / "weights.bin"
    before = filestate.Identity.of(target.stat())
    _write_through_mapping(target)
    unchanged_stat = filestate.Identity.of(target.stat()) == before

    with pytest.raises(VerificationError) as err:
        verify(shm_model, keys[1], cache=cache)
    assert [f.rule for f in err.value.findings] == ["TG503"]
    result = verify_report(shm_model, keys[1], cache=cache)
    assert result.stats.files_from_cache == 0 and result.stats.bytes_hashed == 256 * 64
    assert "hashed afresh" in result.hash_mode
    assert any("tmpfs" in n and "memory-backed" in n for n in result.notes)

    print(f"a write through a mapping on tmpfs left the stat unchanged: {unchanged_stat}")
    if unchanged_stat:
        # The threat is real on this kernel: a cache that trusted tmpfs would pass it.
        monkeypatch.setattr(build_module, "FilesystemTrust", _TrustEverything)
        seal(shm_model, keys[0], cache=cache)  # re-seal the changed file; cache filled
        before = filestate.Identity.of(target.stat())
        _write_through_mapping(target)
        assert filestate.Identity.of(target.stat()) == before
        fooled = verify_report(shm_model, keys[1], cache=cache)
        assert fooled.stats.files_from_cache == 1 and not fooled.report.findings


def test_disk_filesystems_keep_the_cache(
    keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "w.bin").write_bytes(b"x" * 1000)
    if FilesystemTrust().why_not(root.stat().st_dev) is not None:
        pytest.skip("the test folder is not on a local disk filesystem")
    monkeypatch.setattr(filestate, "RACY_NS", 0)
    cache = DigestCache(tmp_path / "cache.json")
    seal(root, keys[0], cache=cache)
    result = verify_report(root, keys[1], cache=cache)
    assert result.stats.files_from_cache == 1 and result.hash_mode.startswith("cached")
    full = verify_report(root, keys[1], cache=cache, full=True)
    assert full.stats.files_from_cache == 0 and full.hash_mode.startswith("full")
    none = verify_report(root, keys[1], cache=False)
    assert none.hash_mode.startswith("no cache")


def _mountinfo(tmp_path: Path, lines: list[str]) -> dict[tuple[int, int], Mount]:
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return read_mounts(str(path))


def test_mount_table_verdicts(tmp_path: Path) -> None:
    mounts = _mountinfo(
        tmp_path,
        [
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            "30 27 0:27 / /dev/shm rw - tmpfs tmpfs rw,size=100k",
            "40 27 0:40 / /mnt/nfs rw - nfs4 server:/x rw,vers=4.2",
            "41 27 0:41 / /mnt/fuse rw - fuse.sshfs host:/ rw",
            "42 27 0:42 / /work\\040dir rw master:3 - xfs /dev/sdb rw",
            "50 27 0:50 / /ctr rw - overlay overlay rw,lowerdir=/l,upperdir=/dev/shm/up,workdir=/w",
            "51 27 0:51 / /ctr2 rw - overlay overlay rw,lowerdir=/l,upperdir=/var/up,workdir=/w",
            "52 27 0:52 / /img ro - overlay overlay ro,lowerdir=/a:/b",
            "garbage line",
        ],
    )
    trust = FilesystemTrust(mounts)
    assert trust.why_not(os.makedev(254, 0)) is None
    assert mounts[(0, 42)].point == "/work dir" and trust.why_not(os.makedev(0, 42)) is None
    assert "memory-backed" in (trust.why_not(os.makedev(0, 27)) or "")
    assert (trust.why_not(os.makedev(0, 40)) or "").startswith("nfs4")
    assert (trust.why_not(os.makedev(0, 41)) or "").startswith("fuse.sshfs")
    assert "overlay" in (trust.why_not(os.makedev(0, 50)) or "")
    assert trust.why_not(os.makedev(0, 51)) is None  # upper layer on ext4
    assert trust.why_not(os.makedev(0, 52)) is None  # read-only overlay
    assert "cannot be identified" in (trust.why_not(os.makedev(9, 9)) or "")
    assert FilesystemTrust(read_mounts(str(tmp_path / "absent"))).why_not(0) is not None
