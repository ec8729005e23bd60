"""Compare what a replay recorded with what the ledger recorded, field by field.

Group digests decide equality; the per-tensor digests (4 hex digits keyed and
4 plain per tensor, see :meth:`Fingerprint.compact`) only say which tensors
differ.  In ``plain`` mode (no run key) only the unkeyed digests are compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trainguard.explain.replay import samples
from trainguard.explain.replay.result import FIELD_ORDER, FieldDiff

Label = Callable[[str], str]


@dataclass(frozen=True)
class Sides:
    """For one step: tensor names and resolved "before" per-tensor digests, ledger vs replay."""

    mode: str
    checked: bool  # a full-check step (step % every == 0): "before" and "rng" were taken
    params: tuple[Sequence[str], Sequence[str]]
    optimizer: tuple[Sequence[str], Sequence[str]]
    before: tuple[str | None, str | None]
    label: Label
    grad_norm: bool = True  # False: the run's norms came from its loop, not the guard
    budget: bool = False  # watch(budget=...): full fingerprints only at some steps


def digest(record: dict[str, Any], name: str, mode: str) -> Any:
    if mode == "keyed":
        return record.get(name)
    plain = record.get("plain")
    return plain.get(name) if isinstance(plain, dict) else None


def per_tensor(compact: Any, names: Sequence[str], mode: str) -> dict[str, str] | None:
    if not isinstance(compact, str) or not names or len(compact) != 8 * len(names):
        return None
    lo = 0 if mode == "keyed" else 4
    return {n: compact[8 * i + lo : 8 * i + lo + 4] for i, n in enumerate(names)}


def differing(
    compacts: tuple[Any, Any], names: tuple[Sequence[str], Sequence[str]], mode: str, label: Label
) -> tuple[tuple[str, ...], bool]:
    """Names of the tensors whose digests differ, and whether that could be told."""
    a = per_tensor(compacts[0], names[0], mode)
    b = per_tensor(compacts[1], names[1], mode)
    if a is None or b is None:
        return (), False
    every = list(dict.fromkeys([*names[0], *names[1]]))
    return tuple(label(n) for n in every if a.get(n) != b.get(n)), True


def _tensors(record: dict[str, Any], name: str) -> Any:
    tensors = record.get("tensors")
    return tensors.get(name) if isinstance(tensors, dict) else None


def _same_name(name: str) -> str:
    return name


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def compare_step(rec: dict[str, Any], rep: dict[str, Any], sides: Sides) -> list[FieldDiff]:
    """Every field of step record ``rep`` (replay) that differs from ``rec`` (ledger)."""
    mode = sides.mode
    diffs = []
    if list(sides.params[0]) != list(sides.params[1]):
        diffs.append(FieldDiff("layout", len(sides.params[0]), len(sides.params[1])))
    groups = ["batch", "after", "optimizer"] + (["before"] if sides.checked else [])
    for name in groups:
        a, b = digest(rec, name, mode), digest(rep, name, mode)
        if a == b:
            continue
        if a is None and (sides.budget or name in ("batch", "before")):
            continue  # not fingerprinted at this step (a sampled step, no batch, every=)
        if a is None:  # the guard fingerprints after every step: its hooks did not run
            diffs.append(FieldDiff(name, None, b, (), False))
            continue
        if name == "batch":
            diffs.append(FieldDiff(name, a, b))
            continue
        names = sides.optimizer if name == "optimizer" else sides.params
        compacts = sides.before if name == "before" else (_tensors(rec, name), _tensors(rep, name))
        label = sides.label if name == "optimizer" else _same_name
        tensors, known = differing(compacts, names, mode, label)
        diffs.append(FieldDiff(name, a, b, tensors, known))
    if sides.checked:
        # Generators both sides watched: a data loader's are recorded only when the guard
        # was given it, and CUDA's once CUDA is initialised; what they drive shows anyway
        # (the batch, dropout in the loss).
        a_all, b_all = rec.get("rng") or {}, rep.get("rng") or {}
        a_rng = {g: d for g, d in a_all.items() if g in b_all}
        b_rng = {g: d for g, d in b_all.items() if g in a_all}
        if a_rng != b_rng:
            gens = sorted(a_rng)
            diffs.append(
                FieldDiff(
                    "rng",
                    a_rng,
                    b_rng,
                    tuple(g for g in gens if a_rng.get(g) != b_rng.get(g)),
                )
            )
    for name in ("loss", "grad_norm", "lr"):
        if name == "grad_norm" and not sides.grad_norm:
            continue
        if not _same(rec.get(name), rep.get(name)):
            diffs.append(FieldDiff(name, rec.get(name), rep.get(name)))
    return sorted(diffs, key=lambda d: FIELD_ORDER.index(d.field))


def windows(records: Sequence[dict[str, Any]]) -> str:
    """``sam: 4 tensors`` for each declared window, in order."""
    return "; ".join(f"{r.get('reason')!s:.40}: {r.get('count')} tensor(s)" for r in records)


def compare_outside(
    recorded: Sequence[dict[str, Any]],
    replayed: Sequence[dict[str, Any]],
    mode: str,
    budget: bool = False,
) -> list[FieldDiff]:
    """The step's declared windows (guard.outside_step in training, ctx.outside_step in the
    entry): the same number, each with the same reason and tensors written and, keyed, the
    digest of the weights after it (exact mode records one; a budget run's windows are
    compared by reason only).  None replayed: not compared here (the caller notes it; the
    step's records still hold the weights).
    """
    if not replayed:
        return []
    if not recorded:
        return [FieldDiff("outside", "no declared window", windows(replayed))]

    def seen(r: dict[str, Any]) -> list[Any]:
        if budget:  # a budget run names tensors by version counter and records no digest
            return [r.get("reason")]
        # Further optimizers' writes (monitor/optimizers.py lanes): their tensors, and in
        # keyed mode their digests (a lane records keyed digests only).
        lanes = r.get("optimizers") or {}
        others = {
            label: (w.get("tensors"), w.get("after") if mode == "keyed" else None)
            for label, w in (lanes.items() if isinstance(lanes, dict) else ())
            if isinstance(w, dict)
        }
        return [r.get("reason"), r.get("count"), r.get("tensors"), digest(r, "after", mode),
                others]  # fmt: skip

    if [seen(r) for r in recorded] == [seen(r) for r in replayed]:
        return []
    written: list[str] = []
    for ra, rb in zip(recorded, replayed, strict=False):
        names = (list(ra.get("tensors") or []), list(rb.get("tensors") or []))
        same = digest(ra, "after", mode) == digest(rb, "after", mode)
        for name in names[0] + names[1]:
            if name not in written and (not same or name not in names[0] or name not in names[1]):
                written.append(str(name))
    return [FieldDiff("outside", windows(recorded), windows(replayed), tuple(written[:50]))]


def compare_state(
    expected: dict[str, Any],
    restored: dict[str, Any],
    mode: str,
    params: tuple[Sequence[str], Sequence[str]],
    optimizer: tuple[Sequence[str], Sequence[str]],
    label: Label,
) -> list[FieldDiff]:
    """The restored parameters and optimizer state against the ledger's at that position."""
    diffs = []
    for key, field_name, names in (
        ("params", "params", params),
        ("optimizer", "optimizer-state", optimizer),
    ):
        a, b = digest(expected, key, mode), digest(restored, key, mode)
        if a == b:
            continue
        tensors, known = differing(
            (_tensors(expected, key), _tensors(restored, key)),
            names,
            mode,
            label if key == "optimizer" else _same_name,
        )
        diffs.append(FieldDiff(field_name, a, b, tensors, known))
    return diffs


def _names(d: FieldDiff) -> str:
    if not d.tensors_known:
        return "(tensors not recorded)"
    if not d.tensors:
        return "(no single tensor's digest differs)"
    more = f" and {len(d.tensors) - 6} more" if len(d.tensors) > 6 else ""
    return ", ".join(d.tensors[:6]) + more


def _carried_names(d: FieldDiff) -> str:
    """``scheduler gamma (0.7 -> 0.9)``: values shown for plain numbers and short texts."""
    out = []
    for name in d.tensors[:6]:
        a = d.recorded.get(name) if isinstance(d.recorded, dict) else None
        b = d.replayed.get(name) if isinstance(d.replayed, dict) else None
        if isinstance(a, str) and isinstance(b, str) and max(len(a), len(b)) <= 40:
            out.append(f"{name} ({_short(a)} -> {_short(b)})")
        else:
            out.append(name)
    more = f" and {len(d.tensors) - 6} more" if len(d.tensors) > 6 else ""
    return ", ".join(out) + more


def _short(text: str) -> str:
    """A canonical value (``float:0.7``) as it reads."""
    kind, colon, value = text.partition(":")
    return value if colon and kind in ("int", "bool", "str", "NoneType") else text


def cause(
    diffs: Sequence[FieldDiff], step: int, kind: str, *, checked: bool = True, hooked: bool = True
) -> str:
    """One sentence: the most telling difference, in the order things happen.

    ``checked``: the weights before the step were fingerprinted (a full-check step);
    ``hooked``: the guard's optimizer hooks ran at the step (its record says so).
    """
    by = {d.field: d for d in diffs}
    if kind == "checkpoint":
        if "file" in by:
            return "the file was changed after it was recorded (its BLAKE3 digest differs)"
        if "run" in by:
            d = by["run"]
            return f"the file holds {d.replayed}, the ledger records {d.recorded}"
        if "carried" in by:
            origin = (
                f"replaying up to step {step - 1} ends in" if step else "the entry point builds"
            )
            return (
                f"it restores state that differs from what {origin}: "
                f"{_carried_names(by['carried'])}"
            )
        if "carried-step" in by:
            return (
                f"the random states it restores are not those the record of step {step - 1} "
                "took after that step's forward and backward (the segment before was not "
                f"replayed): {_carried_names(by['carried-step'])}"
            )
        if "carried-schedule" in by:
            return (
                "the schedule or hyper-parameters it restores are not what the entry's own "
                "scheduler and param groups give when stepped to its count (the segment before "
                f"was not replayed): {_carried_names(by['carried-schedule'])}"
            )
        if "carried-ledger" in by:
            return (
                "the state it restores differs from the ledger's record of the save: "
                f"{_carried_names(by['carried-ledger'])}"
            )
        parts = [
            f"{'parameters' if d.field == 'params' else 'optimizer state'} {_names(d)}"
            for d in diffs
            if d.field in ("params", "optimizer-state")
        ]
        where = f"after step {step - 1}" if step else "at the run's start"
        return f"its {'; '.join(parts)} differ from the run's state {where}"
    hookless = [d for d in diffs if d.field in ("after", "optimizer") and d.recorded is None]
    if hookless or not hooked:
        what = (
            "the guard's optimizer hooks did not run at this step"
            if not hooked
            else "the ledger has no fingerprint after this step although the guard takes "
            "one at every step: its optimizer hooks did not run"
        )
        return (
            f"{what} (the optimizer's step, its class or the optimizer was replaced), so "
            "the update was not the watched optimizer's"
        )
    if "layout" in by:
        return "the entry point built a model whose tensor names differ from the recorded run"
    sampled = samples.cause(by, step)
    if sampled is not None:
        return sampled
    if "batch" in by:
        return "the batch differs: the data, or the position in it, is not the recorded one"
    if "outside" in by:
        d = by["outside"]
        return (
            "the weights written in a declared window (guard.outside_step) differ from "
            f"redoing the declared work: recorded {d.recorded}, replayed {d.replayed}"
            + (f"; tensors {', '.join(d.tensors[:6])}" if d.tensors else "")
        )
    if "before" in by:
        return (
            f"parameters changed between steps {step - 1} and {step}, outside the "
            f"optimizer step: {_names(by['before'])}"
        )
    if "rng" in by:
        gens = ", ".join(by["rng"].tensors) or "?"
        return f"the random state ({gens}) differs after forward and backward"
    if "lr" in by:
        lr = by["lr"]
        return f"the learning rate differs: recorded {lr.recorded}, replayed {lr.replayed}"
    if ("loss" in by or "grad_norm" in by) and not checked:
        return (
            "the loss or gradient differs; the weights before this step were not "
            "fingerprinted (the guard's every= skips it), so the change may be earlier"
        )
    if "loss" in by or "grad_norm" in by:
        return (
            "the same weights and data gave another loss or gradient: the forward or "
            "backward pass, or the gradients before the optimizer step, differ"
        )
    parts = [f"{d.field}: {_names(d)}" for d in diffs if d.field in ("after", "optimizer")]
    return "the optimizer update differs from the recorded one (" + "; ".join(parts) + ")"
