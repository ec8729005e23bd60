"""A sample that comes back different from the last time its index was loaded (TG1309).

The data loader's batch sampler is wrapped so that each batch's indices are
queued as they are drawn; ``guard.step(batch=...)`` then fingerprints each
row of the batch and compares it with the row seen under the same index.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.fingerprint import Fingerprinter


class SampleCheck(Check):
    def __init__(self, fp: Fingerprinter, dataloader: Any) -> None:
        self.fp = fp
        self._queue: list[list[int]] = []
        self._seen: dict[int, str] = {}
        self._wrapped: tuple[Any, type] | None = None
        self._wrap(dataloader)

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
        self._wrapped = (batch_sampler, original_cls)

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        if not end.batch or not self._queue:
            return []
        indices = self._queue.pop(0)
        n = len(indices)
        if not all(t.shape and t.shape[0] == n for t in end.batch):
            return []
        alerts = []
        for row, index in enumerate(indices):
            fp = self.fp.fingerprint((str(i), t[row]) for i, t in enumerate(end.batch)).digest
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
