"""Optimizer state found in a flattened checkpoint, and matched to its parameters.

Any ``<prefix>param_groups.<g>.*`` with ``<prefix>state.<i>.*`` beside it is an
optimizer (``optimizer.``, ``optimizers.0.``, or the root of a bare optimizer
state dict).  Its parameter ids are matched to model tensors by the
``param_names`` torch saves when the optimizer was given named parameters,
else by order and shape among the floating-point tensors outside any
optimizer (buffers such as ``running_mean`` left out).  An ambiguous match is
reported as a reason, never guessed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from trainguard.explain.diff.entries import TensorEntry, TensorSource, ValueEntry, dtype
from trainguard.findings import Finding
from trainguard.rules import finding as rule_finding

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MODEL_GROUP_NAMES = ("model", "model_state_dict", "state_dict", "module", "net", "network")

_STATE = re.compile(
    r"^(?P<p>(?:.+\.)?)state\.(?P<i>\d+)\."
    r"(?P<k>exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer|step)$"
)
_GROUP = re.compile(r"^(?P<p>(?:.+\.)?)param_groups\.(?P<g>\d+)\.(?P<rest>.+)$")


@dataclass
class Group:
    ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    hyper: dict[str, str] = field(default_factory=dict)  # path suffix -> entry path

    def number(self, src: TensorSource, key: str, default: float) -> float:
        path = self.hyper.get(key)
        value = src.scalar(path) if path else None
        return default if value is None else value

    def flag(self, src: TensorSource, key: str) -> bool | None:
        entry = src.entries.get(self.hyper.get(key, ""))
        return entry.text == "True" if isinstance(entry, ValueEntry) else None


@dataclass
class Optimizer:
    prefix: str
    groups: list[Group]
    state: dict[int, dict[str, str]]  # param id -> {"exp_avg": entry path, ...}
    params: dict[int, str] = field(default_factory=dict)  # param id -> model tensor path
    group_of: dict[int, Group] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return [i for g in self.groups for i in g.ids]


def find_optimizers(src: TensorSource) -> list[Optimizer]:
    states: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    groups: dict[str, dict[int, Group]] = defaultdict(lambda: defaultdict(Group))
    for path, entry in src.entries.items():
        m = _STATE.match(path)
        if m:
            states[m["p"]][int(m["i"])][m["k"]] = path
            continue
        m = _GROUP.match(path)
        if not m:
            continue
        group = groups[m["p"]][int(m["g"])]
        head = m["rest"].partition(".")[0]
        if head == "params" and isinstance(entry, ValueEntry) and entry.number is not None:
            group.ids.append(int(entry.number))
        elif head == "param_names" and isinstance(entry, ValueEntry) and entry.string:
            group.names.append(entry.string)
        elif head != "params":
            group.hyper[m["rest"]] = path
    found = []
    for prefix, by_index in groups.items():
        opt = Optimizer(prefix, [by_index[k] for k in sorted(by_index)], dict(states[prefix]))
        opt.group_of = {i: g for g in opt.groups for i in g.ids}
        found.append(opt)
    return found


def in_optimizer(path: str, opts: list[Optimizer]) -> bool:
    return any(path.startswith((f"{o.prefix}state.", f"{o.prefix}param_groups.")) for o in opts)


def _model_tensors(src: TensorSource, opts: list[Optimizer]) -> list[str]:
    return [
        p
        for p, e in src.entries.items()
        if isinstance(e, TensorEntry)
        and dtype(e.dtype).kind in ("float", "bfloat16")
        and not p.endswith(BUFFER_SUFFIXES)
        and not in_optimizer(p, opts)
    ]


def map_params(src: TensorSource, opt: Optimizer, opts: list[Optimizer]) -> str | None:
    """Fill ``opt.params``; returns why it could not, or None."""
    candidates = _model_tensors(src, opts)
    ids = opt.ids
    names = [n for g in opt.groups for n in g.names]
    tops: dict[str, list[str]] = defaultdict(list)
    for p in candidates:
        tops[p.split(".", 1)[0] if "." in p else ""].append(p)
    options: list[tuple[str, list[str]]] = []
    if names and len(names) == len(ids):
        for top in ["", *tops]:
            wanted = [f"{top}.{n}" if top else n for n in names]
            if all(w in src.entries for w in wanted):
                options.append((top, wanted))
    else:
        for top, paths in [("", candidates), *tops.items()]:
            if len(paths) == len(ids) and _shapes_fit(src, opt, ids, paths):
                options.append((top, paths))
    distinct = {tuple(p): (top, p) for top, p in options}
    if not distinct:
        return "no set of model tensors matches the optimizer's parameters"
    if len(distinct) > 1:
        preferred = [v for v in distinct.values() if v[0] in MODEL_GROUP_NAMES]
        if len(preferred) != 1:
            return "several sets of model tensors match the optimizer's parameters"
        distinct = {tuple(preferred[0][1]): preferred[0]}
    paths = next(iter(distinct.values()))[1]
    opt.params = dict(zip(ids, paths, strict=True))
    return None


def _shapes_fit(src: TensorSource, opt: Optimizer, ids: list[int], paths: list[str]) -> bool:
    for i, p in zip(ids, paths, strict=True):
        state = opt.state.get(i, {})
        for key in ("exp_avg", "momentum_buffer"):
            s, e = src.entries.get(state.get(key, "")), src.entries.get(p)
            if isinstance(s, TensorEntry) and isinstance(e, TensorEntry) and s.shape != e.shape:
                return False
    return True


def finding(rule: str, message: str, file: str, member: str, **evidence: object) -> Finding:
    return rule_finding(
        rule,
        message,
        file=file,
        member=member,
        evidence={k: fmt_evidence(v) for k, v in evidence.items()},
    )


def fmt_evidence(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def betas(src: TensorSource, g: Group) -> tuple[float, float]:
    return g.number(src, "betas.0", 0.9), g.number(src, "betas.1", 0.999)
