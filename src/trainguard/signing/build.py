"""From a walked folder to manifest resources: the shared half of seal and verify."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from trainguard.digest_cache import DigestCache, default_cache_path
from trainguard.errors import UsageError
from trainguard.signing.fstrust import FilesystemTrust
from trainguard.signing.hashing import HashStats, Piece, hash_pieces
from trainguard.signing.manifest import Manifest, Resource, Serialization
from trainguard.signing.tree import (
    DEFAULT_SIGNATURE_NAME,
    GIT_PATHS,
    IgnoreRules,
    Tree,
    is_pattern,
    normalize_ignore,
)

Progress = Callable[[int, int], None]  # (bytes done, bytes to hash)


def default_signature(path: str | os.PathLike[str]) -> Path:
    """``PATH/model.sig`` for a folder (model-signing's name), ``FILE.sig`` for a file."""
    p = Path(path)
    return p / DEFAULT_SIGNATURE_NAME if p.is_dir() else p.with_name(p.name + ".sig")


def relative_inside(root: Path, target: Path) -> str | None:
    """``target`` relative to the folder ``root``, or None when it lies outside."""
    if not root.is_dir():
        return None
    try:
        rel = target.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def split_ignores(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """User ignores as (plain relative paths, glob patterns)."""
    paths: list[str] = []
    patterns: list[str] = []
    for item in items:
        try:
            norm = normalize_ignore(item)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        (patterns if is_pattern(norm) else paths).append(norm)
    return paths, patterns


def open_cache(cache: DigestCache | bool, root: str) -> DigestCache | None:
    """``True``: the user's cache file for this model folder."""
    if cache is True:
        return DigestCache(default_cache_path("model", [os.path.realpath(root)]))
    return cache or None


def hash_folder(
    tree: Tree,
    ser: Serialization,
    cache: DigestCache | bool,
    full: bool,
    workers: int | None,
    progress: Progress | None,
) -> tuple[list[Resource], HashStats, list[str]]:
    """:func:`hash_tree` with the user's cache opened and closed; notes say why a
    cache file was not usable."""
    stats = HashStats()
    opened = open_cache(cache, tree.root)
    try:
        resources = hash_tree(
            tree, ser, opened, full=full, workers=workers, progress=progress, stats=stats
        )
    finally:
        if opened is not None:
            opened.close()
    notes = [opened.disabled] if opened is not None and opened.disabled else []
    return resources, stats, notes


def spans(size: int, shard: int) -> list[tuple[int, int]]:
    """The whole file, or model-signing's shards [0, s), [s, 2s)...; none when empty."""
    if not shard:
        return [(0, size)]
    return [(start, min(start + shard, size)) for start in range(0, size, shard)]


def hash_tree(
    tree: Tree,
    ser: Serialization,
    cache: DigestCache | None,
    *,
    full: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    stats: HashStats | None = None,
    vouch: FilesystemTrust | None = None,
) -> list[Resource]:
    """The resources of every file in ``tree``, hashed as ``ser`` says.

    Digests come from ``cache`` for files whose identity is unchanged (unless
    ``full``); fresh digests are stored back.  Files on a filesystem that cannot
    vouch for their stat (``vouch``, by default the mount table's answer: tmpfs,
    NFS, FUSE...) neither use nor feed the cache; ``stats.cache_refused`` says why.
    """
    stats = stats if stats is not None else HashStats()
    shard = ser.shard_size if ser.method == "shards" else 0
    cached: dict[str, list[bytes]] = {}
    pieces: list[Piece] = []
    refused: set[str] = set()  # files whose filesystem cannot vouch for their stat
    trust = FilesystemTrust() if cache is not None and vouch is None else vouch
    for name, entry in tree.files.items():
        ranges = spans(entry.identity.size, shard)
        hit = None
        why = trust.why_not(entry.identity.dev) if trust is not None else None
        if why is not None and cache is not None:
            refused.add(name)
            if not full:  # --full hashes everything anyway: nothing to explain
                stats.cache_refused[why] = stats.cache_refused.get(why, 0) + 1
        elif cache is not None and not full:
            hit = cache.get(entry.path, entry.identity, ser.hash_type, shard)
        if hit is not None and len(hit) == len(ranges):
            cached[name] = hit
            stats.files_from_cache += 1
        else:
            pieces += [Piece(entry.path, s, e, entry.identity) for s, e in ranges]

    total = sum(p.end - p.start for p in pieces)
    done = 0
    lock = threading.Lock()

    def advance(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    started = time.time_ns()
    digests = hash_pieces(pieces, ser.hash_type, workers=workers, progress=advance, stats=stats)
    fresh: dict[str, list[bytes]] = {}
    for piece, digest in zip(pieces, digests, strict=True):
        fresh.setdefault(piece.path, []).append(digest)

    resources: list[Resource] = []
    for name, entry in tree.files.items():
        found = cached.get(name)
        if found is None:
            found = fresh.get(entry.path, [])
            if cache is not None and name not in refused:
                cache.put(entry.path, entry.identity, ser.hash_type, shard, found, started)
        if shard:
            ranges = spans(entry.identity.size, shard)
            resources += [Resource(name, d, None, s) for s, d in zip(ranges, found, strict=True)]
        else:
            resources.append(Resource(name, found[0], entry.identity.size))
    if cache is not None:
        cache.commit()
    return resources


def verify_ignore_rules(
    root: Path, sig_path: Path, manifest: Manifest, extra: IgnoreRules
) -> IgnoreRules:
    """What verification leaves out: the signed ignores, git's files, the signature."""
    ser = manifest.serialization
    listed = {r.path for r in manifest.resources}
    # model-signing ignores git's files when verifying unless the manifest lists them.
    git = [g for g in GIT_PATHS if not any(p == g or p.startswith(g + "/") for p in listed)]
    sig_rel = relative_inside(root, sig_path)
    own = [sig_rel] if sig_rel else []
    return IgnoreRules(
        tuple(dict.fromkeys([*ser.ignore_paths, *git, *own, *extra.paths])),
        tuple(dict.fromkeys([*ser.ignore_patterns, *extra.patterns])),
    )
