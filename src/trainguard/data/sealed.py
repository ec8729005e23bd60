"""``SealedDataset``: read a sealed dataset's samples, each checked on read.

The honest entry point (and training itself) reads samples through it::

    data = SealedDataset("data/", "data-signer.pub", rank=ctx.rank)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=g)

It verifies the manifest's signature and sidecar once, then digests every
sample it reads from the very bytes it returns and compares with the sealed
digest.  A sample that differs (relabelled, poisoned, replaced at rest) raises
:class:`SampleError`, whose finding (TG1520) names the sample's index, its
shard and record, and the rank that read it; ``on_mismatch="record"`` keeps
the finding in ``findings`` and returns the sample instead (for a survey, never
for training).  A guard given a loader over a ``SealedDataset`` records, per
step, which sample indices its batch came from (:mod:`trainguard.monitor.samples`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainguard.data.formats import BY_NAME, Reader, ShardError, open_shard
from trainguard.data.seal import check_expected, default_signature, open_manifest
from trainguard.errors import TrainguardError, UsageError
from trainguard.findings import Finding
from trainguard.rules import finding

if TYPE_CHECKING:
    from trainguard.signing.keys import PublicKey

OPEN_SHARDS = 4  # readers kept open by default (a torch shard is held in memory whole)
MAX_FINDINGS = 1000  # kept with on_mismatch="record"; later ones are counted


class SampleError(TrainguardError):
    """A sample read through the manifest is not the sealed one (or cannot be read).

    A data loader's worker process re-raises it in the main process as
    ``SampleError(message)`` (torch rebuilds exceptions from their text): the
    message still names the sample, shard and rank; the fields are then unknown.
    """

    def __init__(
        self,
        found: Finding | str,
        index: int = -1,
        shard: str = "",
        record: int = -1,
        rank: int = -1,
    ) -> None:
        if isinstance(found, str):
            found = finding("TG1520", found)
        super().__init__(found.message)
        self.finding = found
        self.index, self.shard, self.record, self.rank = index, shard, record, rank


class SealedDataset:
    """A map-style dataset over the samples a signed manifest lists (see the module).

    ``path``: the dataset's folder (or, for a seal of files, their common folder);
    ``key``: the signer's public key; ``signature``: the manifest (default: the
    folder's ``.trainguard-data.sig``); ``transform``: applied to each verified sample;
    ``open_shards``: shards kept open (a torch shard is loaded whole: with a shuffle over
    many torch shards, raise it to their number, or store the data as ``.npy``, read by row);
    ``expect_digest``: the dataset digest ``trainguard data seal`` printed.  A seal proves
    who signed the data, not which version: an older version signed by the same key
    verifies too, so pin the digest (a mismatch raises VerificationError, TG1522).
    """

    # The guard recognises a sealed dataset by this, without importing this module.
    trainguard_sealed = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: str | os.PathLike[str] | PublicKey,
        *,
        signature: str | os.PathLike[str] | None = None,
        rank: int = 0,
        transform: Any = None,
        on_mismatch: Literal["raise", "record"] = "raise",
        open_shards: int = OPEN_SHARDS,
        expect_digest: str | None = None,
    ) -> None:
        if open_shards < 1:
            raise UsageError("open_shards must be at least 1")
        self.root = Path(path)
        sig = Path(signature) if signature is not None else default_signature(self.root)
        self.manifest = open_manifest(sig, key)  # raises VerificationError
        check_expected(self.manifest, expect_digest, sig)
        self.base = self.root if self.root.is_dir() else self.root.parent
        self.rank = rank
        self.transform = transform
        self.on_mismatch = on_mismatch
        self.open_shards = open_shards
        self.findings: list[Finding] = []
        self.mismatches = 0
        self._open: OrderedDict[int, Reader] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def digest(self) -> str:
        """Which data this is (the manifest's subject digest: shards, bytes and samples),
        the same for any seal of the same data; what a guard records per step."""
        return self.manifest.content

    def __len__(self) -> int:
        return self.manifest.samples

    def where(self, index: int) -> str:
        return self.manifest.where(index)

    def _reader(self, k: int) -> Reader:
        with self._lock:
            reader = self._open.get(k)
            if reader is not None:
                self._open.move_to_end(k)
                return reader
        shard = self.manifest.shards[k]
        reader = open_shard(str(self.base / shard.name), BY_NAME[shard.format])
        if reader.count != shard.samples:
            raise ShardError(
                f"{shard.name}: holds {reader.count} samples, the seal {shard.samples}"
            )
        with self._lock:
            self._open[k] = reader
            while len(self._open) > self.open_shards:
                self._open.popitem(last=False)
        return reader

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        k, record = self.manifest.locate(index)  # IndexError past the end, as a dataset must
        shard = self.manifest.shards[k].name
        try:
            sample, digest = self._reader(k).read(record)
        except (ShardError, OSError) as exc:
            found = self._finding(index, shard, record, f"cannot be read: {exc}")
            raise SampleError(found, index, shard, record, self.rank) from None
        if digest != self.manifest.leaf(index):
            found = self._finding(
                index, shard, record, "differs from its sealed digest (relabelled, poisoned or "
                "replaced since the seal)"
            )  # fmt: skip
            self.mismatches += 1
            if self.on_mismatch == "raise":
                raise SampleError(found, index, shard, record, self.rank)
            if len(self.findings) < MAX_FINDINGS:
                self.findings.append(found)
        return self.transform(sample) if self.transform is not None else sample

    def _finding(self, index: int, shard: str, record: int, what: str) -> Finding:
        return finding(
            "TG1520",
            f"sample {index} (shard {shard} #{record}), read by rank {self.rank}, {what}",
            file=shard,
            evidence={
                "sample": str(index),
                "shard": shard,
                "record": str(record),
                "rank": str(self.rank),
                "manifest": self.manifest.digest,
            },
        )

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the verified manifest, not open readers.
        state = dict(self.__dict__)
        state["_open"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


__all__ = ["SampleError", "SealedDataset"]
