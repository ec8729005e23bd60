"""The signed manifest: an in-toto statement in the OpenSSF model-signing v1 format.

::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": MODEL, "digest": {"sha256": ROOT}}],
     "predicateType": "https://model_signing/signature/v1.0",
     "predicate": {
       "serialization": {"method": "files" | "shards", "hash_type": "sha256",
                         "allow_symlinks": false, "ignore_paths": [...],
                         "shard_size": N (shards only)},
       "resources": [{"name": "dir/file", "algorithm": "sha256",
                      "digest": HEX, "size": BYTES}, ...]}}

``ROOT`` is the SHA-256 of every resource digest, in the order listed (sorted
by path components, then shard offsets).  A shard is named ``path:start:end``
and its algorithm is ``sha256-sharded-N``.  trainguard adds fields that
model-signing ignores: each file's ``size``, ``ignore_patterns`` (globs), and
``predicate.trainguard``: the empty files of a shards manifest and the
:class:`SealInfo` (name, version, time of sealing, version-control digests).

Parsing checks every field it relies on and reports the first problem as a
:class:`ManifestError`: the bytes are signed, but the signer may be a tool
with bugs (model-signing writes ``shard_size`` as a float, for one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from trainguard.signing.hashing import HASHES

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model-signing 0.2 listed each file as a subject; 1.x still verifies those.
PREDICATE_TYPE_V0 = "https://model_signing/Digests/v0.1"
DIGEST_SIZES = {"sha256": 32, "blake3": 32, "blake2b": 64}
MAX_RESOURCES = 1_000_000
MAX_INFO_TEXT = 256  # a name, a version or a timestamp
MAX_VCS_ENTRIES = 1024


class ManifestError(ValueError):
    """The statement is not a model-signing manifest trainguard can check."""


@dataclass(frozen=True)
class Serialization:
    method: str  # "files" or "shards"
    hash_type: str
    shard_size: int = 0  # shards only
    allow_symlinks: bool = False
    ignore_paths: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()

    @property
    def algorithm(self) -> str:
        """The resource algorithm name model-signing records and compares."""
        if self.method == "shards":
            return f"{self.hash_type}-sharded-{self.shard_size}"
        return self.hash_type

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "hash_type": self.hash_type}
        if self.method == "shards":
            out["shard_size"] = self.shard_size
        out["allow_symlinks"] = self.allow_symlinks
        if self.ignore_paths:
            out["ignore_paths"] = list(self.ignore_paths)
        if self.ignore_patterns:
            out["ignore_patterns"] = list(self.ignore_patterns)
        return out


@dataclass(frozen=True)
class Resource:
    path: str  # relative POSIX path, "." for a single-file model
    digest: bytes
    size: int | None = None  # files: recorded by trainguard; None when unknown
    span: tuple[int, int] | None = None  # shards: [start, end)

    @property
    def name(self) -> str:
        """The name in the manifest: ``path``, or ``path:start:end`` for a shard."""
        return self.path if self.span is None else f"{self.path}:{self.span[0]}:{self.span[1]}"


def _sort_key(resource: Resource) -> tuple[list[str], tuple[int, int]]:
    # model-signing sorts pathlib keys: by path components, then shard offsets.
    # Plain string order differs ("a.b" < "a/b" but ["a", "b"] < ["a.b"]).
    return resource.path.split("/"), resource.span or (0, 0)


@dataclass(frozen=True)
class SealInfo:
    """What trainguard signs beside the resources: which release this seal is.

    ``vcs`` maps version-control files that can run commands (``.git/config``,
    ``.git/hooks/*``, ...) to their SHA-256, as found when sealing; None when
    not recorded (model-signing, or an older trainguard).
    """

    name: str | None = None
    version: str | None = None
    sealed_at: str | None = None  # ISO 8601, UTC
    vcs: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("name", "version", "sealed_at", "vcs"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    _expect(
        value is None or (isinstance(value, str) and len(value) <= MAX_INFO_TEXT),
        f"trainguard.{key} is not a short string",
    )
    return value


def _seal_info(raw: dict[str, Any]) -> SealInfo:
    vcs = raw.get("vcs")
    _expect(
        vcs is None
        or (
            isinstance(vcs, dict)
            and len(vcs) <= MAX_VCS_ENTRIES
            and all(isinstance(v, str) and len(v) <= MAX_INFO_TEXT for v in vcs.values())
        ),
        "trainguard.vcs is not a table of digests",
    )
    return SealInfo(_text(raw, "name"), _text(raw, "version"), _text(raw, "sealed_at"), vcs)


@dataclass
class Manifest:
    model_name: str
    serialization: Serialization
    resources: list[Resource] = field(default_factory=list)
    # Shards manifests cannot list empty files (no shard); trainguard records
    # them beside the resources, where model-signing does not look.  None: not
    # recorded (a files manifest, or a shards manifest model-signing made).
    empty_files: tuple[str, ...] | None = None
    info: SealInfo = field(default_factory=SealInfo)

    def canonical(self) -> list[Resource]:
        return sorted(self.resources, key=_sort_key)

    def statement(self) -> dict[str, Any]:
        ordered = self.canonical()
        algorithm = self.serialization.algorithm
        extension = self.info.to_json()
        if self.empty_files is not None:
            extension["empty_files"] = list(self.empty_files)
        items: list[dict[str, Any]] = []
        for r in ordered:
            item: dict[str, Any] = {
                "name": r.name,
                "algorithm": algorithm,
                "digest": r.digest.hex(),
            }
            if r.size is not None:
                item["size"] = r.size
            items.append(item)
        return {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": self.model_name, "digest": {"sha256": root_digest(ordered)}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "serialization": self.serialization.params(),
                "resources": items,
                **({"trainguard": extension} if extension else {}),
            },
        }

    def payload(self) -> bytes:
        return json.dumps(self.statement(), separators=(",", ":")).encode("utf-8")


def root_digest(resources: list[Resource]) -> str:
    hasher = hashlib.sha256()
    for r in resources:
        hasher.update(r.digest)
    return hasher.hexdigest()


def _expect(cond: bool, reason: str) -> None:
    if not cond:
        raise ManifestError(reason)


def _whole(value: object, what: str) -> int:
    # model-signing writes numbers through a protobuf Struct, so 1000 becomes 1000.0.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    _expect(isinstance(value, int) and not isinstance(value, bool), f"{what} is not an integer")
    assert isinstance(value, int)
    return value


def _serialization(raw: object) -> Serialization:
    _expect(isinstance(raw, dict), "predicate.serialization is missing")
    assert isinstance(raw, dict)
    method, hash_type = raw.get("method"), raw.get("hash_type")
    _expect(method in ("files", "shards"), f"unknown serialization method {method!r}")
    _expect(hash_type in HASHES, f"unsupported hash type {hash_type!r}")
    shard_size = _whole(raw.get("shard_size"), "shard_size") if method == "shards" else 0
    _expect(method == "files" or shard_size > 0, "shard_size must be positive")
    symlinks = raw.get("allow_symlinks", False)
    _expect(isinstance(symlinks, bool), "allow_symlinks is not a boolean")
    lists = {}
    for key in ("ignore_paths", "ignore_patterns"):
        value = raw.get(key, [])
        _expect(
            isinstance(value, list) and all(isinstance(v, str) for v in value),
            f"{key} is not a list of strings",
        )
        lists[key] = tuple(value)
    return Serialization(
        str(method),
        str(hash_type),
        shard_size,
        bool(symlinks),
        lists["ignore_paths"],
        lists["ignore_patterns"],
    )


def _digest(value: object, algorithm: str, what: str) -> bytes:
    _expect(isinstance(value, str), f"{what}: digest is not a hex string")
    assert isinstance(value, str)
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        raise ManifestError(f"{what}: digest is not hex") from None
    _expect(len(digest) == DIGEST_SIZES[algorithm], f"{what}: digest has the wrong length")
    return digest


def _resource(raw: object, ser: Serialization) -> Resource:
    _expect(isinstance(raw, dict), "a resource is not an object")
    assert isinstance(raw, dict)
    name = raw.get("name")
    _expect(isinstance(name, str), "a resource has no name")
    assert isinstance(name, str)
    what = f"resource {name!r}"
    _expect(raw.get("algorithm") == ser.algorithm, f"{what}: algorithm is not {ser.algorithm}")
    digest = _digest(raw.get("digest"), ser.hash_type, what)
    size = _whole(raw["size"], f"{what}: size") if "size" in raw else None
    _expect(size is None or size >= 0, f"{what}: negative size")
    if ser.method == "files":
        return Resource(name, digest, size)
    parts = name.rsplit(":", 2)
    _expect(
        len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit(),
        f"{what}: a shard name must be path:start:end",
    )
    start, end = int(parts[1]), int(parts[2])
    _expect(start < end <= start + ser.shard_size, f"{what}: bad shard range")
    return Resource(parts[0], digest, None, (start, end))


def parse_statement(payload: bytes) -> Manifest:
    """The manifest in a verified DSSE payload; :class:`ManifestError` if unusable."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise ManifestError("the signed payload is not JSON") from None
    _expect(isinstance(doc, dict), "the signed payload is not a JSON object")
    _expect(doc.get("_type") == STATEMENT_TYPE, "not an in-toto v1 statement")
    subjects = doc.get("subject")
    _expect(isinstance(subjects, list) and len(subjects) > 0, "the statement has no subject")
    if doc.get("predicateType") == PREDICATE_TYPE_V0:
        return _parse_v0(subjects)
    _expect(doc.get("predicateType") == PREDICATE_TYPE, "not a model-signing v1.0 predicate")
    _expect(len(subjects) == 1 and isinstance(subjects[0], dict), "expected exactly one subject")
    subject = subjects[0]
    predicate = doc.get("predicate")
    _expect(isinstance(predicate, dict), "the statement has no predicate")
    ser = _serialization(predicate.get("serialization"))
    raw_resources = predicate.get("resources")
    _expect(isinstance(raw_resources, list), "predicate.resources is missing")
    _expect(len(raw_resources) <= MAX_RESOURCES, f"more than {MAX_RESOURCES} resources")
    resources = [_resource(r, ser) for r in raw_resources]
    names = {r.name for r in resources}
    _expect(len(names) == len(resources), "a resource is listed twice")
    subject_digest = subject.get("digest")
    expected = subject_digest.get("sha256") if isinstance(subject_digest, dict) else None
    _expect(expected == root_digest(resources), "the subject digest does not match the resources")
    name = subject.get("name")
    extension = predicate.get("trainguard", {})
    _expect(isinstance(extension, dict), "predicate.trainguard is not an object")
    empty = extension.get("empty_files")
    _expect(
        empty is None
        or (
            isinstance(empty, list)
            and len(empty) <= MAX_RESOURCES
            and all(isinstance(e, str) for e in empty)
        ),
        "trainguard.empty_files is not a list of names",
    )
    model = name if isinstance(name, str) else ""
    empty_files = None if empty is None else tuple(empty)
    return Manifest(model, ser, resources, empty_files, _seal_info(extension))


def _parse_v0(subjects: list[Any]) -> Manifest:
    ser = Serialization("files", "sha256")
    resources = []
    for s in subjects:
        _expect(isinstance(s, dict) and isinstance(s.get("name"), str), "a subject has no name")
        digest = s.get("digest")
        _expect(isinstance(digest, dict), f"subject {s['name']!r} has no digest")
        resources.append(Resource(s["name"], _digest(digest.get("sha256"), "sha256", s["name"])))
    _expect(len({r.path for r in resources}) == len(resources), "a subject is listed twice")
    return Manifest("", ser, resources)
