"""Which samples a step trained on, against what the sealed data and the seed give.

Replay reads the sealed dataset through the honest entry point, with the data
loader's generators restored from the checkpoint, so its guard records (per
step, :mod:`trainguard.monitor.samples`) the samples the seed's order puts in
each batch, each checked against its sealed digest on read.  The ledger holds
what training recorded.  A step differs:

* ``unrecorded`` (TG1523): replay reads sealed data, the ledger has no sample
  record for the step (no batch passed to ``guard.step``, or no loader);
* ``dataset`` (TG1522): training read other sealed data;
* ``order`` (TG1521): the index list differs from the seed's, the batch has
  another length, or a row training fed is another row of the expected batch
  (swapped, duplicated);
* ``samples`` (TG1520): a row holds content that is not the expected sample's
  (relabelled, poisoned, or a sample from outside the batch).

Each differing position is named with the sample the seed puts there, its
shard and record, and the rank.
"""

from __future__ import annotations

from typing import Any

from trainguard.data.sealed import SampleError
from trainguard.explain.replay.result import Divergence, FieldDiff
from trainguard.monitor.samples import ROW_HEX

FIELDS = ("dataset", "unrecorded", "order", "samples")
MAX_NAMED = 8


def _rows(entry: dict[str, Any], mode: str) -> list[str]:
    text = entry.get("rows")
    if not isinstance(text, str):
        return []
    lo = 0 if mode == "keyed" else ROW_HEX
    width = 2 * ROW_HEX
    return [text[i + lo : i + lo + ROW_HEX] for i in range(0, len(text), width)]


def _name(position: int, indices: list[int] | None, dataset: Any, rank: int) -> str:
    if indices is None or position >= len(indices):
        return f"position {position} of the batch (rank {rank})"
    index = indices[position]
    where = dataset.where(index) if dataset is not None else "?"
    return f"sample {index} ({where}) at position {position}, rank {rank}"


def recorded_data(steps: dict[int, dict[str, Any]], begin: int, end: int) -> list[str]:
    """The sealed datasets' digests the run recorded reading in steps ``begin..end-1``."""
    found: dict[str, None] = {}
    for s in range(begin, end):
        samples = steps.get(s, {}).get("samples")
        if isinstance(samples, dict) and isinstance(samples.get("dataset"), str):
            found[samples["dataset"]] = None
    return list(found)


def _is(recorded: Any, expect: str) -> bool:
    """Whether a recorded dataset digest is the pinned one.  The guard records the first
    16 hex digits (64 bits: a rollback crafted to share them is a second preimage)."""
    return isinstance(recorded, str) and len(recorded) >= 16 and expect.startswith(recorded)


def _pinned(theirs: Any, ours: Any, expect: str, rank: int) -> list[FieldDiff]:
    """A seal proves who signed the data, not which version: the digest the user pinned
    is the anchor, against what the run recorded and what the entry reads."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("dataset"), str):
        return [FieldDiff("unrecorded", None, expect, (f"rank {rank}",), False)]
    if not _is(theirs["dataset"], expect):
        which = ("the run's data, not the pinned",)
        return [FieldDiff("dataset", theirs["dataset"], expect, which)]
    if isinstance(ours, dict) and not _is(ours.get("dataset"), expect):
        which = ("the entry's data, not the pinned",)
        return [FieldDiff("dataset", ours.get("dataset"), expect, which)]
    return []


def compare(
    rec: dict[str, Any],
    rep: dict[str, Any],
    mode: str,
    indices: list[int] | None,
    dataset: Any,
    rank: int,
    *,
    expect: str | None = None,
) -> list[FieldDiff]:
    """The sample differences at one step (``indices``: what replay's batch came from;
    ``expect``: the dataset digest the user pinned)."""
    theirs, ours = rec.get("samples"), rep.get("samples")
    if expect is not None:
        pinned = _pinned(theirs, ours, expect, rank)
        if pinned:
            return pinned
    if not isinstance(ours, dict):
        return []  # the entry reads no sealed data
    if not isinstance(theirs, dict) or (theirs.get("n") == 0 and ours.get("n")):
        # No record, or no batch passed to guard.step: the rows that trained are unknown.
        return [FieldDiff("unrecorded", None, ours.get("n"), (f"rank {rank}",), False)]
    if theirs.get("dataset") != ours.get("dataset"):
        return [FieldDiff("dataset", theirs.get("dataset"), ours.get("dataset"))]
    out = []
    key = "indices" if mode == "keyed" else "indices_plain"
    a_rows, b_rows = _rows(theirs, mode), _rows(ours, mode)
    order_differs = theirs.get("n") != ours.get("n") or (
        theirs.get("indices") is not None
        and ours.get("indices") is not None
        and theirs.get(key) != ours.get(key)
    )
    differing = [
        j for j in range(max(len(a_rows), len(b_rows)))
        if j >= len(a_rows) or j >= len(b_rows) or a_rows[j] != b_rows[j]
    ]  # fmt: skip
    # A row that is another row of the expected batch was moved or duplicated: order.
    moved = [j for j in differing if j < len(a_rows) and a_rows[j] in b_rows]
    changed = [j for j in differing if j not in moved]
    if order_differs or moved:
        named = [_name(j, indices, dataset, rank) for j in (moved or differing)]
        listed = tuple(named[:MAX_NAMED]) or (f"the batch's sample indices (rank {rank})",)
        out.append(FieldDiff("order", theirs.get(key), ours.get(key), listed))
    if changed:
        named = [_name(j, indices, dataset, rank) for j in changed]
        out.append(
            FieldDiff("samples", theirs.get("rows"), ours.get("rows"), tuple(named[:MAX_NAMED]))
        )
    return out


UNCHECKED = (
    "the run recorded which sealed samples each step read, but the entry's data loader "
    "(Replayable.dataloader) does not read a SealedDataset: samples not checked, only the "
    "batch digests (docs/data.md)"
)


def unchecked(rec: dict[str, Any], rep: dict[str, Any]) -> bool:
    """The ledger holds a sample record the replay cannot compare (no sealed loader)."""
    return isinstance(rec.get("samples"), dict) and not isinstance(rep.get("samples"), dict)


def cause(by: dict[str, FieldDiff], step: int) -> str | None:
    """The sentence for a sample difference at ``step``, or None when there is none."""
    if "unrecorded" in by:
        return (
            f"the ledger has no record of the samples step {step} trained on, although the "
            f"entry reads sealed data ({by['unrecorded'].tensors[0]}): the loop passed no "
            "batch to guard.step, or the guard was not given the data loader"
        )
    if "dataset" in by:
        d = by["dataset"]
        which = d.tensors[0] if d.tensors else "the run's data, not the entry's"
        return (
            f"the sealed data differs ({which}): digest {str(d.recorded)[:16]}... where "
            f"{str(d.replayed)[:16]}... was expected (another dataset, or another version of "
            "it signed by the same key: a rollback)"
        )
    parts = []
    if "order" in by:
        d = by["order"]
        what = "; ".join(d.tensors) or "the batch"
        parts.append(
            f"the batch's samples are not in the order the sampler's seed gives: expected {what}"
        )
    if "samples" in by:
        d = by["samples"]
        parts.append(
            "the batch holds other content than the sealed sample at "
            + "; ".join(d.tensors)
            + " (relabelled, poisoned or another sample)"
        )
    return ". ".join(parts) if parts else None


def of_guard(guard: Any) -> tuple[list[int] | None, Any]:
    """What the replay guard's batch came from, and the sealed dataset it reads."""
    recorder = getattr(guard, "samples", None)
    if recorder is None:
        return None, None
    return recorder.last_indices, recorder.dataset


def read_divergence(step: int, exc: SampleError, alerts: tuple[str, ...]) -> Divergence:
    """Replay read a sample whose bytes are not the sealed ones (at step ``step``)."""
    if exc.index >= 0:
        name = f"sample {exc.index} (shard {exc.shard} #{exc.record}), rank {exc.rank}"
    else:  # re-raised from a loader's worker process: only its message came through
        name = str(exc).strip().splitlines()[-1][:300]
    diff = FieldDiff("samples", exc.finding.evidence.get("manifest"), None, (name,))
    why = f"reading the sealed data for step {step}: {exc}"
    return Divergence(step, "step", (diff,), why, alerts)
