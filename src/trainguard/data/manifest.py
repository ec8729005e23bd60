"""The signed dataset manifest and its sidecar of per-sample digests.

The manifest is an in-toto statement, signed as a DSSE envelope in a Sigstore
bundle exactly like a model seal (:mod:`trainguard.signing.bundle`), with its
own predicate type::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": DATASET, "digest": {"sha256": ROOT}}],
     "predicateType": "https://trainguard.dev/sealed-dataset/v1",
     "predicate": {"shards": [{"name": "a/b.npy", "format": "npy", "size": BYTES,
                               "sha256": HEX, "samples": N, "root": MERKLE_HEX}, ...],
                   "leaves": {"sha256": HEX, "size": BYTES}, "samples": TOTAL,
                   "sealed_at": "...Z"}}

Per-sample digests (32 bytes each) are not in the signed payload, which stays
small: they sit in a sidecar file (``LEAVES_MAGIC`` then every shard's leaves
in manifest order), whose SHA-256 the payload pins.  Each shard's ``root`` is
the Merkle root of its leaves, so one shard's leaves can be checked alone.
``ROOT`` is the SHA-256 of the canonical JSON of the shard list.  Global sample
indices run over the shards in manifest order.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from trainguard.data.formats import BY_NAME, MAX_SAMPLES_PER_SHARD
from trainguard.signing.manifest import STATEMENT_TYPE

PREDICATE_TYPE = "https://trainguard.dev/sealed-dataset/v1"
LEAVES_MAGIC = b"TGLEAVES/1\n"
LEAF = 32
MAX_SHARDS = 200_000
MAX_SAMPLES = 50_000_000  # a sidecar of 1.6 GB
MAX_NAME = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DataManifestError(ValueError):
    """The signed payload is not a dataset manifest trainguard can use."""


@dataclass(frozen=True)
class Shard:
    name: str  # POSIX path relative to the dataset's root
    format: str
    size: int
    sha256: str
    samples: int
    root: str  # Merkle root of its sample digests

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "samples": self.samples,
            "root": self.root,
        }


@dataclass
class DataManifest:
    name: str
    shards: tuple[Shard, ...]
    leaves_sha256: str
    leaves_size: int
    sealed_at: str
    digest: str = ""  # SHA-256 of the signed payload (this seal)
    leaves: bytes = b""  # the sidecar's leaves, once checked against leaves_sha256
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        total, self._starts = 0, []
        for s in self.shards:
            self._starts.append(total)
            total += s.samples
        self.samples = total

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample ``index`` -> (shard number, index within the shard)."""
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} is outside the dataset's {self.samples}")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    @property
    def content(self) -> str:
        """The statement's subject digest: which data (shards, their bytes and samples),
        the same for every seal of the same data whoever signed it and when."""
        return dataset_root(self.shards)

    def first(self, k: int) -> int:
        """The global index of shard ``k``'s first sample."""
        return self._starts[k]

    def leaf(self, index: int) -> bytes:
        return self.leaves[LEAF * index : LEAF * (index + 1)]

    def shard_leaves(self, k: int) -> list[bytes]:
        a = self._starts[k]
        return [self.leaf(a + i) for i in range(self.shards[k].samples)]

    def where(self, index: int) -> str:
        """``shard a.npy #3``: where sample ``index`` lives."""
        k, i = self.locate(index)
        return f"shard {self.shards[k].name} #{i}"

    def payload(self) -> bytes:
        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": self.name, "digest": {"sha256": dataset_root(self.shards)}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "shards": [s.as_json() for s in self.shards],
                "leaves": {"sha256": self.leaves_sha256, "size": self.leaves_size},
                "samples": self.samples,
                "sealed_at": self.sealed_at,
            },
        }
        return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def merkle_root(leaves: list[bytes]) -> str:
    """RFC 6962-style: leaves hashed with 0x00, inner nodes with 0x01; an odd node rises."""
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def dataset_root(shards: tuple[Shard, ...]) -> str:
    text = json.dumps([s.as_json() for s in shards], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def leaves_file(leaves: list[bytes]) -> bytes:
    return LEAVES_MAGIC + b"".join(leaves)


def _expect(cond: bool, reason: str) -> None:
    if not cond:
        raise DataManifestError(reason)


def _count(value: object, what: str, cap: int) -> int:
    _expect(type(value) is int and 0 <= value <= cap, f"{what} must be a whole number <= {cap}")
    assert isinstance(value, int)
    return value


def _shard(raw: object) -> Shard:
    _expect(isinstance(raw, dict), "a shard entry is not an object")
    assert isinstance(raw, dict)
    name, fmt, sha, root = raw.get("name"), raw.get("format"), raw.get("sha256"), raw.get("root")
    _expect(isinstance(name, str) and 0 < len(name) <= MAX_NAME, "a shard has no usable name")
    assert isinstance(name, str)
    parts = name.split("/")
    _expect(
        not name.startswith("/") and ".." not in parts and "" not in parts,
        f"shard name {name[:80]!r} leaves the dataset's folder",
    )
    _expect(fmt in BY_NAME, f"shard {name}: unknown format {str(fmt)[:40]!r}")
    for what, value in (("sha256", sha), ("root", root)):
        _expect(
            isinstance(value, str) and bool(_HEX64.fullmatch(value)), f"shard {name}: bad {what}"
        )
    return Shard(
        name,
        str(fmt),
        _count(raw.get("size"), f"shard {name}: size", 2**62),
        str(sha),
        _count(raw.get("samples"), f"shard {name}: samples", MAX_SAMPLES_PER_SHARD),
        str(root),
    )


def parse(payload: bytes) -> DataManifest:
    """The manifest in a verified payload; :class:`DataManifestError` if it is not one."""
    try:
        statement = json.loads(payload)
    except (ValueError, RecursionError):
        raise DataManifestError("the signed payload is not JSON") from None
    _expect(isinstance(statement, dict), "the signed payload is not a JSON object")
    _expect(statement.get("_type") == STATEMENT_TYPE, "not an in-toto statement")
    _expect(
        statement.get("predicateType") == PREDICATE_TYPE,
        "not a dataset manifest (a model seal? use `trainguard verify`)",
    )
    pred = statement.get("predicate")
    _expect(isinstance(pred, dict), "the predicate is missing")
    raw_shards = pred.get("shards")
    _expect(isinstance(raw_shards, list) and len(raw_shards) <= MAX_SHARDS, "bad shard list")
    shards = tuple(_shard(s) for s in raw_shards)
    _expect(len({s.name for s in shards}) == len(shards), "a shard is listed twice")
    leaves = pred.get("leaves")
    _expect(isinstance(leaves, dict), "the leaves entry is missing")
    sha = leaves.get("sha256")
    _expect(isinstance(sha, str) and bool(_HEX64.fullmatch(sha)), "bad leaves sha256")
    total = sum(s.samples for s in shards)
    _expect(total <= MAX_SAMPLES, f"over {MAX_SAMPLES} samples")
    _expect(pred.get("samples") == total, "the sample count disagrees with the shards'")
    size = _count(leaves.get("size"), "leaves size", len(LEAVES_MAGIC) + LEAF * MAX_SAMPLES)
    _expect(size == len(LEAVES_MAGIC) + LEAF * total, "the leaves size disagrees with the count")
    subjects = statement.get("subject")
    _expect(isinstance(subjects, list) and len(subjects) == 1, "expected one subject")
    subject = subjects[0]
    _expect(isinstance(subject, dict), "the subject is not an object")
    name = subject.get("name")
    _expect(isinstance(name, str) and len(name) <= MAX_NAME, "the subject has no name")
    digest = subject.get("digest")
    _expect(
        isinstance(digest, dict) and digest.get("sha256") == dataset_root(shards),
        "the subject's digest is not the shard list's",
    )
    sealed_at = pred.get("sealed_at")
    manifest = DataManifest(
        str(name), shards, str(sha), size, sealed_at if isinstance(sealed_at, str) else ""
    )
    manifest.digest = hashlib.sha256(payload).hexdigest()
    return manifest


def attach_leaves(manifest: DataManifest, data: bytes) -> None:
    """Check the sidecar against the signed payload (digest, then each shard's Merkle root)
    and keep it; :class:`DataManifestError` naming the first shard that disagrees."""
    _expect(len(data) == manifest.leaves_size, "the leaves file has the wrong size")
    _expect(
        hashlib.sha256(data).hexdigest() == manifest.leaves_sha256,
        "the leaves file is not the one the manifest signs (its SHA-256 differs)",
    )
    _expect(data.startswith(LEAVES_MAGIC), "the leaves file lacks its magic")
    manifest.leaves = data[len(LEAVES_MAGIC) :]
    for k, s in enumerate(manifest.shards):
        _expect(merkle_root(manifest.shard_leaves(k)) == s.root, f"shard {s.name}: leaves differ")
