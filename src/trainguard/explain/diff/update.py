"""Does the change A -> B follow the update the saved optimizer state predicts?

One Adam step moves a parameter by exactly ``-lr * (m_hat / (sqrt(v_hat) + eps)
+ wd * w)`` (the weight-decay term for AdamW), with the moments and step count
saved in B and the learning rate saved in A (schedulers step after the
optimizer).  Over a few steps the path still points mostly along B's
predicted direction (measured on an MLP: cosine >= 0.6 at 10 steps, 1.000 at
one); SGD moves along its momentum buffer.  A flipped update gives cosine
near -1; a scaled one, a size far from ``lr`` times the predicted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainguard.explain.diff.entries import CHUNK, TensorEntry, TensorSource, as_f64
from trainguard.explain.diff.optim_state import Group, Optimizer, betas, finding
from trainguard.explain.diff.result import TensorDiff
from trainguard.findings import Finding

SINGLE_STEP_MIN_COS = 0.9  # one Adam step is predicted exactly (measured: 1.000)
MULTI_STEP_MIN_COS = -0.2  # per tensor, a few steps apart (measured: >= 0.6 at 10 steps)
MULTI_STEP_MIN_GLOBAL_COS = 0.2  # all parameters together
MIN_NUMEL_FOR_DIRECTION = 16  # smaller tensors turn too easily over several steps
MAX_DIRECTION_STEPS = 10  # past this, the last moments no longer predict the path
MAGNITUDE_RATIO = 3.0  # one step's size against lr * predicted, either way


@dataclass
class _Dots:
    dd: float = 0.0  # |delta|^2
    du: float = 0.0  # delta . u
    dw: float = 0.0  # delta . w_old
    uu: float = 0.0
    uw: float = 0.0
    ww: float = 0.0

    def cosine(self, wd: float) -> float | None:
        """cos(delta, -(u + wd * w_old))."""
        norm2 = self.uu + 2 * wd * self.uw + wd * wd * self.ww
        if self.dd <= 0 or norm2 <= 0:
            return None
        return -(self.du + wd * self.dw) / math.sqrt(self.dd * norm2)

    def add(self, other: _Dots) -> None:
        for k in ("dd", "du", "dw", "uu", "uw", "ww"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def directions(
    older: TensorSource,
    newer: TensorSource,
    o_old: Optimizer,
    o_new: Optimizer,
    deltas: dict[int, float],
    diffs: dict[str, TensorDiff],
    label: str,
) -> tuple[list[Finding], list[str]]:
    findings: list[Finding] = []
    total = _Dots()
    steps_seen: set[float] = set()
    kinds: set[str] = set()
    for i, path in o_new.params.items():
        state = o_new.state.get(i, {})
        d = diffs.get(path)
        group = o_new.group_of.get(i)
        if d is None or d.status != "changed" or group is None:
            continue
        if "exp_avg" in state and "exp_avg_sq" in state:
            steps = deltas.get(i)
            if steps is None or steps < 1 or steps > MAX_DIRECTION_STEPS:
                steps_seen.add(-1.0 if steps is None else steps)
                continue
            kinds.add("adam")
            dots, wds, lr = _adam_dots(older, newer, path, state, group)
        elif "momentum_buffer" in state:
            steps, kinds = 0.0, kinds | {"sgd"}
            dots, wds, lr = _sgd_dots(older, newer, path, state, group), [0.0], None
        else:
            continue
        steps_seen.add(steps)
        total.add(dots)
        cos = max((c for c in (dots.cosine(w) for w in wds) if c is not None), default=None)
        if cos is None:
            continue
        single = steps == 1
        limit = SINGLE_STEP_MIN_COS if single else MULTI_STEP_MIN_COS
        if not single and d.numel < MIN_NUMEL_FOR_DIRECTION:
            continue
        what = "one Adam step" if single else f"{steps:g} steps" if steps else "SGD momentum"
        if cos < limit:
            findings.append(
                finding(
                    "TG1503",
                    f"{path} moved against what the saved optimizer state predicts for "
                    f"{what}: cosine {cos:.3f} (an honest update gives >= {limit:g})",
                    newer.path,
                    path,
                    cosine=cos,
                    steps=steps,
                )
            )
        elif single and lr:
            ratio = _magnitude(dots, wds, lr)
            if ratio is not None and not 1 / MAGNITUDE_RATIO <= ratio <= MAGNITUDE_RATIO:
                findings.append(
                    finding(
                        "TG1503",
                        f"{path} moved {ratio:.3g} times as far as one Adam step at the saved "
                        f"learning rate ({lr:g}) would move it",
                        newer.path,
                        path,
                        ratio=ratio,
                        lr=lr,
                    )
                )
    notes = []
    if any(s > MAX_DIRECTION_STEPS or s < 0 for s in steps_seen):
        notes.append(
            f"optimizer {label}: more than {MAX_DIRECTION_STEPS} steps apart (or no step "
            "counter) for some parameters: their update direction was not checked"
        )
    global_cos = total.cosine(0.0)
    if not findings and global_cos is not None and kinds and 1.0 not in steps_seen:
        if global_cos < MULTI_STEP_MIN_GLOBAL_COS:
            findings.append(
                finding(
                    "TG1503",
                    f"optimizer {label}: the parameters together moved at cosine "
                    f"{global_cos:.3f} to the direction the saved optimizer state predicts",
                    newer.path,
                    "",
                    cosine=global_cos,
                )
            )
    return findings, notes


def _adam_dots(
    older: TensorSource, newer: TensorSource, path: str, state: dict[str, str], g: Group
) -> tuple[_Dots, list[float], float]:
    t = newer.scalar(state.get("step", "")) or 1.0
    b1, b2 = betas(newer, g)
    eps = g.number(newer, "eps", 1e-8)
    wd = g.number(newer, "weight_decay", 0.0)
    decoupled = g.flag(newer, "decoupled_weight_decay")
    maximize = g.flag(newer, "maximize") is True
    wds = [wd] if decoupled else [0.0] if decoupled is False else [0.0, wd]
    v_key = "max_exp_avg_sq" if g.flag(newer, "amsgrad") and "max_exp_avg_sq" in state else None
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    dots = _Dots()
    w_old = older.read(path)
    w_new = newer.read(path)
    m_all, v_all = newer.read(state["exp_avg"]), newer.read(state[v_key or "exp_avg_sq"])
    dt = newer.entries[path]
    st = newer.entries[state["exp_avg"]]
    assert isinstance(dt, TensorEntry) and isinstance(st, TensorEntry)
    for s in range(0, len(w_old), CHUNK):
        wo = as_f64(w_old[s : s + CHUNK], dt.dtype)
        delta = as_f64(w_new[s : s + CHUNK], dt.dtype) - wo
        m = as_f64(m_all[s : s + CHUNK], st.dtype)
        v = as_f64(v_all[s : s + CHUNK], st.dtype)
        u = (m / bc1) / (np.sqrt(np.maximum(v, 0) / bc2) + eps)
        if maximize:
            u = -u
        _accumulate_dots(dots, delta, u, wo)
    # The learning rate of a step is the one saved before it (schedulers step after).
    lr = g.number(older, "lr", 0.0) if older is not newer else 0.0
    return dots, wds, lr


def _sgd_dots(
    older: TensorSource, newer: TensorSource, path: str, state: dict[str, str], g: Group
) -> _Dots:
    maximize = g.flag(newer, "maximize") is True
    dots = _Dots()
    dt = newer.entries[path]
    bt = newer.entries[state["momentum_buffer"]]
    assert isinstance(dt, TensorEntry) and isinstance(bt, TensorEntry)
    w_old, w_new, buf = older.read(path), newer.read(path), newer.read(state["momentum_buffer"])
    for s in range(0, len(w_old), CHUNK):
        wo = as_f64(w_old[s : s + CHUNK], dt.dtype)
        delta = as_f64(w_new[s : s + CHUNK], dt.dtype) - wo
        u = as_f64(buf[s : s + CHUNK], bt.dtype)
        _accumulate_dots(dots, delta, -u if maximize else u, wo)
    return dots


def _accumulate_dots(dots: _Dots, delta: np.ndarray, u: np.ndarray, w: np.ndarray) -> None:
    ok = np.isfinite(delta) & np.isfinite(u) & np.isfinite(w)
    if not ok.all():
        delta, u, w = delta[ok], u[ok], w[ok]
    dots.dd += float(np.dot(delta, delta))
    dots.du += float(np.dot(delta, u))
    dots.dw += float(np.dot(delta, w))
    dots.uu += float(np.dot(u, u))
    dots.uw += float(np.dot(u, w))
    dots.ww += float(np.dot(w, w))


def _magnitude(dots: _Dots, wds: list[float], lr: float) -> float | None:
    """|delta| / |lr * (u + wd * w)| for the weight-decay variant closest to it."""
    ratios = []
    for wd in wds:
        norm2 = dots.uu + 2 * wd * dots.uw + wd * wd * dots.ww
        if norm2 > 0:
            ratios.append(math.sqrt(dots.dd / norm2) / lr)
    return min(ratios, key=lambda r: abs(math.log(r)) if r > 0 else math.inf, default=None)
