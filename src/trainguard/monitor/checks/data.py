"""A sample that comes back different from the last time its index was loaded (TG1309).

The data loader's batch sampler is wrapped so that each batch's indices are
queued as they are drawn, and the loader itself so that each batch it yields
(inputs *and* targets, after collation, in the training process) is queued
too; ``guard.step`` then fingerprints each row of every tensor of that batch
and compares it with the row seen under the same index.  A loop that passes
only its inputs to ``guard.step(batch=...)`` still has its labels checked.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.fingerprint import Fingerprinter
from trainguard.monitor.setup import tensors_in


class SampleCheck(Check):
    def __init__(self, fp: Fingerprinter, dataloader: Any) -> None:
        self.fp = fp
        self._queue: list[list[int]] = []
        self._seen: dict[int, str] = {}
        self._batches: list[Any] = []  # what the loader yielded, oldest first
        self._wrap(dataloader)
        self._wrap_loader(dataloader)

    def _wrap_loader(self, dataloader: Any) -> None:
        batches = self._batches
        loader_cls = type(dataloader)

        class RecordingLoader(loader_cls):  # type: ignore[valid-type,misc]
            def __iter__(self) -> Any:
                for batch in loader_cls.__iter__(self):
                    batches.append(batch)
                    yield batch

        dataloader.__class__ = RecordingLoader

    def _wrap(self, dataloader: Any) -> None:
        batch_sampler = dataloader.batch_sampler
        if batch_sampler is None:
            return
        queue = self._queue
        original_cls = type(batch_sampler)
        original_iter = original_cls.__iter__

        class Recording(original_cls):  # type: ignore[valid-type,misc]
            def __iter__(self) -> Any:
                for indices in original_iter(self):
                    queue.append(list(indices))
                    yield indices

        batch_sampler.__class__ = Recording

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        import torch

        yielded = tensors_in(self._batches.pop(0), torch) if self._batches else []
        batch = yielded or end.batch
        if not batch or not self._queue:
            return []
        indices = self._queue.pop(0)
        n = len(indices)
        if not all(t.shape and t.shape[0] == n for t in batch):
            return []
        alerts = []
        for row, index in enumerate(indices):
            fp = self.fp.fingerprint((str(i), t[row]) for i, t in enumerate(batch)).digest
            seen = self._seen.setdefault(index, fp)
            if seen != fp:
                alerts.append(
                    ctx.alert(
                        "TG1309",
                        f"sample {index} differs from the last time it was loaded",
                        index=index,
                    )
                )
                self._seen[index] = fp
        return alerts
