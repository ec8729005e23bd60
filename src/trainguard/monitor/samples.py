"""Which samples a step's batch came from, for a loader over sealed data.

When the guard's data loader reads a sealed dataset (one that says
``trainguard_sealed``, :class:`trainguard.data.sealed.SealedDataset`), each step
record gets a ``samples`` entry::

    {"n": ROWS, "rows": 8 hex digits per row (4 keyed, 4 plain),
     "indices": KEYED, "indices_plain": PLAIN, "dataset": MANIFEST_SHA256[:16]}

``rows`` digests row ``i`` of every tensor of the batch passed to
``guard.step(batch=...)`` that is ``ROWS`` long along dim 0; ``indices`` digests
the list of sample indices the loader's sampler drew for this batch.  Replay
records the same from the seed the checkpoint restores and names the positions
that differ (:mod:`trainguard.explain.replay.samples`).

The indices are read by wrapping the batch sampler's ``sampler`` (an instance
attribute; no class is patched): the wrapper groups the indices it yields into
batches exactly as :class:`torch.utils.data.BatchSampler` does.  With
``num_workers=0`` the loader draws a batch's indices right before it yields the
batch, so the latest complete group is the step's; a loader with worker
processes draws ahead, so its steps record ``indices: None`` and only the rows
are compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

ROW_HEX = 4  # per side: 1 in 65,536 that a changed row goes unnamed (the group digest decides)


class IndexLog:
    """Stands in for a batch sampler's ``sampler``; keeps the last complete batch of indices."""

    def __init__(self, inner: Any, batch_size: int, drop_last: bool) -> None:
        self.inner, self.batch_size, self.drop_last = inner, batch_size, drop_last
        self.latest: list[int] | None = None

    def __iter__(self) -> Iterator[Any]:
        group: list[int] = []
        for index in self.inner:
            group.append(int(index))
            if len(group) == self.batch_size:
                self.latest, group = group, []
            yield index
        if group and not self.drop_last:
            self.latest = group  # BatchSampler yields the short last batch

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        # generator, epoch, set_epoch...: the sampler's own (read by the seed checks too).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def sealed_dataset(loader: Any) -> Any:
    """The sealed dataset a loader reads directly, else None.  (Not through a Subset: its
    sampler's indices would be the subset's, and replay names the sealed ones.)"""
    data = getattr(loader, "dataset", None)
    return data if getattr(type(data), "trainguard_sealed", False) else None


class SampleRecorder:
    def __init__(self, loader: Any, key: bytes) -> None:
        self.dataset = sealed_dataset(loader)
        self.keyed = hashlib.sha256(b"trainguard-samples/1" + key).digest()
        self.log: IndexLog | None = None
        batch_sampler: Any = getattr(loader, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        size = getattr(batch_sampler, "batch_size", None)
        if getattr(loader, "num_workers", 1) == 0 and inner is not None and isinstance(size, int):
            if isinstance(inner, IndexLog):  # another guard over the same loader
                self.log = inner
            else:
                self.log = IndexLog(inner, size, bool(getattr(batch_sampler, "drop_last", False)))
                batch_sampler.sampler = self.log
        self.last_indices: list[int] | None = None

    @classmethod
    def for_loader(cls, loader: Any, key: bytes) -> SampleRecorder | None:
        """A recorder when ``loader`` reads sealed data, else None (nothing is recorded)."""
        return cls(loader, key) if sealed_dataset(loader) is not None else None

    def _digest(self, data: bytes) -> tuple[str, str]:
        keyed = hashlib.blake2b(data, key=self.keyed, digest_size=8).hexdigest()
        return keyed, hashlib.blake2b(data, digest_size=8).hexdigest()

    def record(self, tensors: list[Any]) -> dict[str, Any]:
        """The ``samples`` entry of this step's record (``tensors``: the batch's)."""
        import torch

        self.last_indices = self.log.latest if self.log is not None else None
        if self.log is not None:
            self.log.latest = None  # a step without a new batch records no indices
        n = int(tensors[0].shape[0]) if tensors and tensors[0].dim() >= 1 else 0
        rows = [t.detach().cpu().contiguous() for t in tensors if t.dim() >= 1 and t.shape[0] == n]
        compact = []
        for i in range(n):
            h = hashlib.sha256()
            for t in rows:
                row = t[i]
                raw = row.reshape(-1).view(torch.uint8).numpy().tobytes() if row.numel() else b""
                h.update(f"{row.dtype}{tuple(row.shape)}{len(raw)}".encode())
                h.update(raw)
            keyed, plain = self._digest(h.digest())
            compact.append(keyed[:ROW_HEX] + plain[:ROW_HEX])
        entry: dict[str, Any] = {"n": n, "rows": "".join(compact), "indices": None}
        if self.last_indices is not None:
            text = ",".join(map(str, self.last_indices)).encode()
            entry["indices"], entry["indices_plain"] = self._digest(text)
        digest = getattr(self.dataset, "digest", None)
        entry["dataset"] = digest[:16] if isinstance(digest, str) else None  # which seal
        return entry
