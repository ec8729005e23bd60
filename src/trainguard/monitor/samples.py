"""Which samples a step's batch came from, for a loader over sealed data.

When the guard's data loader reads a sealed dataset (one that says
``trainguard_sealed``, :class:`trainguard.data.sealed.SealedDataset`), each step
record gets a ``samples`` entry::

    {"n": ROWS, "rows": 8 hex digits per row (4 keyed, 4 plain),
     "indices": KEYED, "indices_plain": PLAIN, "dataset": DATASET_DIGEST[:16]}

``rows`` digests row ``i`` of every tensor of the batch passed to
``guard.step(batch=...)`` that is ``ROWS`` long along dim 0; ``indices`` digests
the list of sample indices the loader's sampler drew for this batch.  Replay
records the same from the seed the checkpoint restores and names the positions
that differ (:mod:`trainguard.explain.replay.samples`).

The indices are read without patching any class: the batch sampler's
``sampler`` attribute is replaced by a pass-through (:class:`IndexLog`) that
groups the indices it yields into batches exactly as
:class:`torch.utils.data.BatchSampler` does, and the loader's ``_get_iterator``
(an instance attribute) wraps each iterator it makes so that the batches it
yields are counted.  A loader yields its batches in the order their indices
were drawn (``in_order``, the default), so the batch of a step is the group
numbered by the yields of the current iterator, whether the indices were drawn
just before (``num_workers=0``) or ahead by worker prefetching, and whatever
batches a loop dropped (replay's ``epochs_from`` skips the first batches of a
mid-epoch segment).  A loader with ``in_order=False``, or without a batch
sampler, records ``indices: None``; only the rows are compared then.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from typing import Any

ROW_HEX = 4  # per side: 1 in 65,536 that a changed row goes unnamed (the group digest decides)


class IndexLog:
    """Stands in for a batch sampler's ``sampler``: keeps the index groups of the current
    pass (consumed ones are dropped) and counts the batches the loader yielded of it."""

    def __init__(self, inner: Any, batch_size: int, drop_last: bool) -> None:
        self.inner, self.batch_size, self.drop_last = inner, batch_size, drop_last
        self.groups: deque[list[int]] = deque()
        self.first = 0  # the number of the oldest group kept
        self.yielded = 0  # batches the current loader iterator yielded

    def __iter__(self) -> Iterator[Any]:
        groups = self.groups = deque()  # a new pass: a new loader iterator draws
        self.first = 0
        group: list[int] = []
        for index in self.inner:
            group.append(int(index))
            if len(group) == self.batch_size:
                groups.append(group)
                group = []
            yield index
        if group and not self.drop_last:
            groups.append(group)  # BatchSampler yields the short last batch

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        # generator, epoch, set_epoch...: the sampler's own (read by the seed checks too).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def current(self) -> list[int] | None:
        """The indices of the batch the loader yielded last, or None if unknown."""
        k = self.yielded - 1
        while self.groups and self.first < k:  # groups before it were trained on already
            self.groups.popleft()
            self.first += 1
        if k < self.first or k - self.first >= len(self.groups):
            return None
        return self.groups[k - self.first]


class _Counted:
    """A loader's iterator, counting what it yields (everything else is the iterator's)."""

    def __init__(self, it: Any, log: IndexLog) -> None:
        self._it, self._log = it, log
        log.yielded = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self._log.yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)

    def _reset(self, *args: Any, **kwargs: Any) -> Any:
        self._log.yielded = 0  # persistent workers: a new epoch on the same iterator
        return self._it._reset(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_it":
            raise AttributeError(name)
        return getattr(self._it, name)


def _attach(loader: Any) -> IndexLog | None:
    batch_sampler: Any = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    size = getattr(batch_sampler, "batch_size", None)
    make = getattr(loader, "_get_iterator", None)
    if inner is None or not isinstance(size, int) or not callable(make):
        return None
    if not getattr(loader, "in_order", True):
        return None  # batches may come back in another order than drawn
    if isinstance(inner, IndexLog):  # another guard over the same loader
        return inner
    log = IndexLog(inner, size, bool(getattr(batch_sampler, "drop_last", False)))
    batch_sampler.sampler = log
    loader._get_iterator = lambda: _Counted(make(), log)
    return log


def sealed_dataset(loader: Any) -> Any:
    """The sealed dataset a loader reads directly, else None.  (Not through a Subset: its
    sampler's indices would be the subset's, and replay names the sealed ones.)"""
    data = getattr(loader, "dataset", None)
    return data if getattr(type(data), "trainguard_sealed", False) else None


class SampleRecorder:
    def __init__(self, loader: Any, key: bytes) -> None:
        self.dataset = sealed_dataset(loader)
        self.keyed = hashlib.sha256(b"trainguard-samples/1" + key).digest()
        self.log = _attach(loader)
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

        self.last_indices = self.log.current() if self.log is not None else None
        # Dense tensors only (a sparse or nested one has no row bytes to hash).
        dense = [t for t in tensors if t.layout == torch.strided and t.dim() >= 1]
        n = int(dense[0].shape[0]) if dense else 0
        rows = [t.detach().cpu().contiguous() for t in dense if t.shape[0] == n]
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
