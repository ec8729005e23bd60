"""Forensic checks of a checkpoint diff: changes an honest optimizer step cannot make.

The optimizer state saved beside the weights is a witness.  Adam's moments
after ``t`` steps obey ``exp_avg**2 <= C(t) * exp_avg_sq`` (Cauchy-Schwarz over
the gradients that built them), so a step counter that was reset or moments
that were swapped show up; one Adam step moves every weight exactly along
``-(m_hat / (sqrt(v_hat) + eps) + wd * w)``, and a few steps still mostly
along it; SGD moves along its momentum buffer.  A parameter with no optimizer
state (or ``requires_grad=False``) was not trained, so it must not change.
And training changes tensors densely: a handful of changed elements beside
dense updates, or alone, is an edit.

Optimizer state is found and matched to parameters by
:mod:`~trainguard.explain.diff.optim_state`; update directions are checked by
:mod:`~trainguard.explain.diff.update`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import numpy as np

from trainguard.explain.diff.entries import CHUNK, TensorEntry, TensorSource, as_f64, dtype
from trainguard.explain.diff.optim_state import (
    Optimizer,
    betas,
    find_optimizers,
    finding,
    in_optimizer,
    map_params,
)
from trainguard.explain.diff.result import DiffReport, TensorDiff
from trainguard.explain.diff.update import directions
from trainguard.findings import Finding

MOMENT_TOLERANCE = 1e-3  # relative slack on the exp_avg bound (float32 rounding)
SPARSE_MAX_FRACTION = 0.01  # "a few elements": at most 1% changed
SPARSE_MIN_NUMEL = 64
DENSE_MEDIAN_FRACTION = 0.5


def forensics(
    sa: TensorSource, sb: TensorSource, report: DiffReport
) -> tuple[list[Finding], list[str]]:
    diffs = {t.path: t for t in report.tensors}
    findings: list[Finding] = []
    notes: list[str] = []
    opts_b, opts_a = find_optimizers(sb), find_optimizers(sa)
    findings += _frozen_by_flag(sa, sb, diffs)
    findings += _concentrated(diffs, opts_a + opts_b, sb.path)
    if not opts_b:
        notes.append("no optimizer state in B: optimizer checks skipped")
    for ob in opts_b:
        oa = next((o for o in opts_a if o.prefix == ob.prefix), None)
        label = ob.prefix.rstrip(".") or "(root)"
        why = map_params(sb, ob, opts_b)
        if why is None and oa is not None:
            why = map_params(sa, oa, opts_a)
            if why is None and oa.params != ob.params:
                why = "A and B map optimizer parameters to different tensors"
        if why is not None:
            notes.append(f"optimizer {label}: {why}; optimizer checks skipped")
            continue
        findings += _moment_bounds(sb, ob)
        if oa is None:
            notes.append(f"optimizer {label} is only in B: update checks skipped")
            findings += _stateless_changed(sb, ob, diffs)
            continue
        findings += _moment_bounds(sa, oa)
        f, n = _pair_checks(sa, sb, oa, ob, diffs, label)
        findings += f
        notes += n
    return findings, notes


# -- frozen parameters -------------------------------------------------------------


def _frozen_by_flag(
    sa: TensorSource, sb: TensorSource, diffs: dict[str, TensorDiff]
) -> list[Finding]:
    out: list[Finding] = []
    for path, d in diffs.items():
        if d.status != "changed":
            continue
        for side, src in (("A", sa), ("B", sb)):
            e = src.entries.get(path)
            if isinstance(e, TensorEntry) and e.parameter and not e.requires_grad:
                out.append(
                    finding(
                        "TG1501",
                        f"{path} changed although it is saved with requires_grad=False in "
                        f"{side}: {d.changed:,} of {d.numel:,} elements",
                        sb.path,
                        path,
                        changed=d.changed,
                        max_abs_diff=d.max_abs,
                    )
                )
                break
    return out


def _stateless_changed(
    src: TensorSource, opt: Optimizer, diffs: dict[str, TensorDiff]
) -> list[Finding]:
    if not opt.state:  # the optimizer never stepped: nothing to compare with
        return []
    out: list[Finding] = []
    for i, path in opt.params.items():
        d = diffs.get(path)
        if d is not None and d.status == "changed" and not opt.state.get(i):
            out.append(
                finding(
                    "TG1501",
                    f"{path} changed but the optimizer holds no state for it (parameter "
                    f"{i}): it received no gradient, so no optimizer step moved it",
                    src.path,
                    path,
                    changed=d.changed,
                    max_abs_diff=d.max_abs,
                )
            )
    return out


# -- step counters and moments -------------------------------------------------------


def moment_bound(b1: float, b2: float, t: float) -> float:
    """The largest exp_avg**2 / exp_avg_sq that ``t`` Adam steps can produce."""
    r = b1 * b1 / b2
    n = max(int(t), 0)
    series = float(n) if abs(1 - r) < 1e-12 else (1 - r**n) / (1 - r)
    return (1 - b1) ** 2 / (1 - b2) * series


def _chunks(src: TensorSource, *paths: str) -> Iterator[list[np.ndarray]]:
    arrays = [src.read(p) for p in paths]
    kinds = [src.entries[p] for p in paths]
    n = min(len(a) for a in arrays)
    for start in range(0, n, CHUNK):
        yield [
            as_f64(a[start : start + CHUNK], e.dtype)  # type: ignore[union-attr]
            for a, e in zip(arrays, kinds, strict=True)
        ]


def _moment_bounds(src: TensorSource, opt: Optimizer) -> list[Finding]:
    out: list[Finding] = []
    for i, state in opt.state.items():
        if "exp_avg" not in state or "exp_avg_sq" not in state or i not in opt.group_of:
            continue
        t = src.scalar(state.get("step", ""))
        if t is None:
            continue
        b1, b2 = betas(src, opt.group_of[i])
        bound = moment_bound(b1, b2, t)
        over = negative = 0
        worst = 0.0
        for m, v in _chunks(src, state["exp_avg"], state["exp_avg_sq"]):
            negative += int(np.count_nonzero(v < 0))
            m2 = m * m
            bad = m2 > bound * (1 + MOMENT_TOLERANCE) * v + 1e-40
            over += int(np.count_nonzero(bad))
            if over:
                worst = max(worst, float(np.max(m2[bad] / np.maximum(v[bad], 1e-300))))
        where = opt.params.get(i, f"parameter {i}")
        if negative:
            out.append(
                finding(
                    "TG1502",
                    f"{where}: exp_avg_sq has {negative:,} negative elements in {src.path}; "
                    "a sum of squared gradients cannot be negative",
                    src.path,
                    state["exp_avg_sq"],
                    negative=negative,
                )
            )
        if over:
            out.append(
                finding(
                    "TG1502",
                    f"{where}: step counter says {t:g} but exp_avg is larger than {t:g} Adam "
                    f"steps can build against exp_avg_sq ({over:,} elements); the counter or "
                    "the moments were replaced",
                    src.path,
                    state["step"],
                    step=t,
                    elements=over,
                    worst_ratio=worst,
                    bound=bound,
                )
            )
    return out


# -- the pair: steps taken between A and B, and the update they imply ----------------


def _pair_checks(
    sa: TensorSource,
    sb: TensorSource,
    oa: Optimizer,
    ob: Optimizer,
    diffs: dict[str, TensorDiff],
    label: str,
) -> tuple[list[Finding], list[str]]:
    findings: list[Finding] = []
    notes: list[str] = []
    steps: dict[int, tuple[float, float]] = {}
    for i in ob.params:
        ta = sa.scalar(oa.state.get(i, {}).get("step", ""))
        tb = sb.scalar(ob.state.get(i, {}).get("step", ""))
        if ta is not None and tb is not None:
            steps[i] = (ta, tb)
    deltas = {i: tb - ta for i, (ta, tb) in steps.items()}
    older, newer, o_old, o_new = sa, sb, oa, ob
    if deltas and all(d < 0 for d in deltas.values()):
        notes.append(f"optimizer {label}: every step counter in B is behind A; B read as older")
        older, newer, o_old, o_new = sb, sa, ob, oa
        deltas = {i: -d for i, d in deltas.items()}
    elif any(d < 0 for d in deltas.values()) and any(d > 0 for d in deltas.values()):
        back = [ob.params[i] for i, d in deltas.items() if d < 0]
        findings.append(
            finding(
                "TG1502",
                f"optimizer {label}: step counters went back for {len(back)} parameters and "
                f"forward for the others (first back: {back[0]})",
                sb.path,
                back[0],
            )
        )
    for side, src, opt in (("A", sa, oa), ("B", sb, ob)):
        findings += _uneven(side, src, opt, label)
    if len(set(deltas.values())) > 1:
        findings.append(
            finding(
                "TG1505",
                f"optimizer {label}: parameters advanced by different numbers of steps "
                f"between A and B ({sorted(set(deltas.values()))})",
                sb.path,
                "",
            )
        )
    findings += _stateless_changed(newer, o_new, diffs)
    findings += _no_step_but_changed(sb, ob, deltas, diffs)
    f, n = directions(older, newer, o_old, o_new, deltas, diffs, label)
    return findings + f, notes + n


def _uneven(side: str, src: TensorSource, opt: Optimizer, label: str) -> list[Finding]:
    out: list[Finding] = []
    for g_index, g in enumerate(opt.groups):
        counts = {src.scalar(opt.state.get(i, {}).get("step", "")) for i in g.ids}
        counts.discard(None)
        if len(counts) > 1:
            out.append(
                finding(
                    "TG1505",
                    f"optimizer {label}, group {g_index} in {side}: parameters carry different "
                    f"step counters ({', '.join(f'{c:g}' for c in sorted(counts))})",  # type: ignore[type-var]
                    src.path,
                    f"{opt.prefix}param_groups.{g_index}",
                )
            )
    return out


def _no_step_but_changed(
    src: TensorSource, opt: Optimizer, deltas: dict[int, float], diffs: dict[str, TensorDiff]
) -> list[Finding]:
    out: list[Finding] = []
    for i, delta in deltas.items():
        if delta != 0:
            continue
        path = opt.params[i]
        moved = [k for k in ("exp_avg", "exp_avg_sq") if _changed(diffs, opt.state[i].get(k, ""))]
        if moved:
            out.append(
                finding(
                    "TG1502",
                    f"{path}: {' and '.join(moved)} changed but the step counter did not",
                    src.path,
                    opt.state[i]["step"],
                )
            )
        elif _changed(diffs, path):
            d = diffs[path]
            out.append(
                finding(
                    "TG1503",
                    f"{path} changed ({d.changed:,} elements) but its optimizer took no step "
                    "and its moments are unchanged: the change came from outside the optimizer",
                    src.path,
                    path,
                    changed=d.changed,
                    max_abs_diff=d.max_abs,
                )
            )
    return out


def _changed(diffs: dict[str, TensorDiff], path: str) -> bool:
    d = diffs.get(path)
    return d is not None and d.status == "changed"


# -- concentrated changes ----------------------------------------------------------------


def _concentrated(diffs: dict[str, TensorDiff], opts: list[Optimizer], file: str) -> list[Finding]:
    model = [
        d
        for d in diffs.values()
        if d.status in ("same", "changed")
        and dtype(d.dtype_a or "").kind in ("float", "bfloat16")
        and not in_optimizer(d.path, opts)
    ]
    out: list[Finding] = []
    for d in model:
        if not (d.changed and d.numel >= SPARSE_MIN_NUMEL and d.fraction <= SPARSE_MAX_FRACTION):
            continue
        others = [o for o in model if o is not d]
        changed_others = [o.fraction for o in others if o.changed]
        if not changed_others:
            context = "every other tensor is bit-identical"
        elif statistics.median(changed_others) >= DENSE_MEDIAN_FRACTION:
            context = (
                f"while the other changed tensors changed densely (median "
                f"{statistics.median(changed_others):.0%} of their elements)"
            )
        else:
            continue
        rows = _whole_rows(d)
        if rows is not None and changed_others:
            continue  # whole rows (embedding rows of the tokens seen): sparse training
        shown = ", ".join(str(i) for i in d.indices[:8])
        out.append(
            finding(
                "TG1504",
                f"{d.path}: only {d.changed:,} of {d.numel:,} elements changed "
                f"({d.fraction:.3%}), {context}; flat indices {shown}",
                file,
                d.path,
                changed=d.changed,
                fraction=d.fraction,
                max_abs_diff=d.max_abs,
                indices=shown,
            )
        )
    return out


def _whole_rows(d: TensorDiff) -> int | None:
    """The number of changed rows when the change is exactly whole rows, else None."""
    shape = d.shape_a or ()
    if len(shape) < 2 or len(d.indices) < d.changed or shape[-1] < 2:
        return None
    width = d.numel // shape[0]
    rows = {i // width for i in d.indices}
    return len(rows) if len(rows) * width == d.changed else None
