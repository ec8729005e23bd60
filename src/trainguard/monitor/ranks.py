"""Judging the rank reports of one comparison (see distributed.py): pure functions.

Every rank runs :func:`judge` on the same list of reports and reaches the same
verdict, so the verdict needs no further collective.  A report is a dict as
:func:`trainguard.monitor.distributed.rank_report` builds it; peers are not
trusted, so every field is checked for its type before use and a malformed
report names its rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trainguard.monitor.calibration import SLOWER, odd_pace

# Fields every rank must share whatever the sharding, and the rule a difference breaks.
COMMON = (
    ("step", "TG1310", "step counter"),
    ("world", "TG1310", "world size"),
    ("key", "TG1310", "run key"),
    ("hyperparameters", "TG1303", "optimizer hyper-parameters"),
)
MAX_NAMED = 5  # shards or functions named in a message (the evidence keeps up to 50)


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str
    evidence: dict[str, Any]


@dataclass
class Verdict:
    findings: list[Finding] = field(default_factory=list)
    reporter: int = 0  # the lowest rank that no finding names
    composed: str = ""  # the whole model's digest, composed from every rank's shards
    shard_count: int = 0
    replicated: int = 0  # labels held by more than one rank (compared)


def digest_of(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":")).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _odd(values: dict[int, Any]) -> list[int]:
    """Ranks outside the majority value; every rank when no value has a majority."""
    if len(values) < 2:
        return []
    counts = Counter(values.values())
    top, n = counts.most_common(1)[0]
    if n == len(values):
        return []
    if n > len(values) / 2:
        return sorted(r for r, v in values.items() if v != top)
    return sorted(values)


def judge(reports: list[dict[str, Any] | None], key: bytes) -> Verdict:
    verdict = Verdict()
    valid: dict[int, dict[str, Any]] = {}
    for rank, report in enumerate(reports):
        if _well_formed(report, rank):
            assert report is not None
            valid[rank] = report
    bad = sorted(set(range(len(reports))) - set(valid))
    if bad:
        verdict.findings.append(
            Finding(
                "TG1310",
                f"rank(s) {_list(bad)} sent no readable rank report",
                {"ranks": bad},
            )
        )
    for name, rule, what in COMMON:
        odd = _odd({r: rep[name] for r, rep in valid.items()})
        if odd:
            values = {str(r): valid[r][name] for r in odd}
            verdict.findings.append(
                Finding(
                    rule,
                    f"rank(s) {_list(odd)} differ from the others in the {what}",
                    {
                        "ranks": odd,
                        "field": name,
                        "values": values,
                    },
                )
            )
    _compare_code(valid, verdict)
    _compare_shards(valid, verdict, key)
    odd, paces = odd_pace({r: rep.get("pace") for r, rep in valid.items()})
    if odd:  # a rank whose torch ops run slower than the others' (monitor/calibration.py)
        verdict.findings.append(
            Finding(
                "TG1307",
                f"rank(s) {_list(odd)} run torch's ops over {SLOWER}x slower, relative to "
                "plain code, than the other ranks: something intercepts torch's ops there "
                "(or their CPUs differ)",
                {"ranks": odd, "phase": "torch", "ratios": paces},
            )
        )
    named = {r for f in verdict.findings for r in f.evidence.get("ranks", [])}
    verdict.reporter = min((r for r in range(len(reports)) if r not in named), default=0)
    return verdict


def _well_formed(report: Any, rank: int) -> bool:
    if not isinstance(report, dict) or report.get("rank") != rank:
        return False
    if not isinstance(report.get("shards"), dict) or not isinstance(report.get("cover"), dict):
        return False
    if not isinstance(report.get("code"), dict):
        return False
    cover_ok = all(
        isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)
        for v in report["cover"].values()
    )
    return cover_ok and all(isinstance(v, str) for v in report["shards"].values())


def _compare_code(valid: dict[int, dict[str, Any]], verdict: Verdict) -> None:
    names = sorted({n for rep in valid.values() for n in rep["code"]})
    by_rank: dict[int, list[str]] = {}
    for name in names:
        for r in _odd({r: rep["code"].get(name) for r, rep in valid.items()}):
            by_rank.setdefault(r, []).append(name)
    if not by_rank:
        return
    odd = sorted(by_rank)
    parts = "; ".join(f"rank {r}: {', '.join(by_rank[r][:MAX_NAMED])}" for r in odd[:MAX_NAMED])
    verdict.findings.append(
        Finding(
            "TG1304",
            f"the training code differs between ranks ({parts})",
            {"ranks": odd, "functions": {str(r): by_rank[r][:50] for r in odd}},
        )
    )


def _compare_shards(valid: dict[int, dict[str, Any]], verdict: Verdict, key: bytes) -> None:
    holders: dict[str, dict[int, str]] = {}
    for r, rep in valid.items():
        for label, digest in rep["shards"].items():
            holders.setdefault(label, {})[r] = digest
    by_rank: dict[int, list[str]] = {}
    composed = hashlib.blake2b(key=key[:32], digest_size=16)
    for label in sorted(holders):
        digests = holders[label]
        odd = _odd(digests)
        for r in odd:
            by_rank.setdefault(r, []).append(label)
        verdict.replicated += len(digests) > 1
        agreed = Counter(digests.values()).most_common(1)[0][0]
        composed.update(f"{label}={agreed};".encode())
    verdict.composed = composed.hexdigest()
    verdict.shard_count = len(holders)
    if by_rank:
        odd = sorted(by_rank)
        parts = "; ".join(f"rank {r}: {', '.join(by_rank[r][:MAX_NAMED])}" for r in odd[:MAX_NAMED])
        verdict.findings.append(
            Finding(
                "TG1310",
                f"rank(s) {_list(odd)} hold different bytes from their replicas ({parts})",
                {"ranks": odd, "shards": {str(r): by_rank[r][:50] for r in odd}},
            )
        )
    _check_cover(valid, verdict)


def _check_cover(valid: dict[int, dict[str, Any]], verdict: Verdict) -> None:
    """The shards of each sharded parameter, over all ranks, must hold it exactly once."""
    parts: dict[str, dict[str, int]] = {}
    total: dict[str, set[int]] = {}
    holders: dict[str, set[int]] = {}
    for r, rep in valid.items():
        for label, (name, numel, whole) in rep["cover"].items():
            parts.setdefault(name, {})[label] = int(numel)
            total.setdefault(name, set()).add(int(whole))
            holders.setdefault(name, set()).add(r)
    for name in sorted(parts):
        held = sum(parts[name].values())
        wholes = total[name]
        if len(wholes) == 1 and held == next(iter(wholes)):
            continue
        verdict.findings.append(
            Finding(
                "TG1310",
                f"the shards of {name} over all ranks cover {held} elements, "
                f"not the {'/'.join(map(str, sorted(wholes)))} of the whole tensor",
                {"tensor": name, "held": held, "ranks_holding": sorted(holders[name])},
            )
        )


def _list(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:20])) + (f" (+{len(ranks) - 20})" if len(ranks) > 20 else "")


# -- code identity that is the same in every process -----------------------------------
def code_digests(optimizer: Any) -> dict[str, str]:
    """Digests of the training machinery's code, equal in two processes running the same code.

    Unlike identity.py's (which include object ids, to see a swap within one
    process), these hash what the code *is*: every layer of a wrapped function
    (a ``functools.wraps`` wrapper counts), its bytecode, constants, names and
    the types of its closure.  A patch present on some ranks only shows as a
    difference between ranks even when it was installed before ``watch``.
    """
    import torch

    from trainguard.monitor.sharding import state_owner

    inner = state_owner(optimizer)
    found = {
        "optimizer.step": getattr(optimizer, "step", None),
        f"{type(optimizer).__name__}.step": getattr(type(optimizer), "step", None),
        f"{type(inner).__name__}.step (local)": getattr(type(inner), "step", None),
        "torch.optim.Optimizer.zero_grad": torch.optim.Optimizer.zero_grad,
        "torch.nn.utils.clip_grad_norm_": torch.nn.utils.clip_grad_norm_,
        "torch.Tensor.backward": torch.Tensor.backward,
        "torch.autograd.backward": torch.autograd.backward,
    }
    out = {name: _code(fn) for name, fn in found.items()}
    # Every function of the optimizer's own module (torch.optim.adamw: adamw,
    # _single_tensor_adamw, ...): the functional implementations are patchable too.
    module = sys.modules.get(type(inner).__module__)
    if module is not None:
        funcs = sorted((n, f) for n, f in vars(module).items() if isinstance(f, types.FunctionType))
        h = hashlib.blake2b(digest_size=8)
        for n, f in funcs:
            h.update(f"{n}={_code(f)};".encode())
        out[f"module {module.__name__}"] = h.hexdigest()
    return out


def _code(fn: Any, depth: int = 0) -> str:
    h = hashlib.blake2b(digest_size=8)
    seen = 0
    while fn is not None and seen < 16:
        h.update(f"{type(fn).__qualname__}|{getattr(fn, '__qualname__', '')}".encode())
        target = getattr(fn, "__func__", fn)
        code = getattr(target, "__code__", None)
        if code is not None:
            h.update(_code_bytes(code, depth))
            for cell in getattr(target, "__closure__", None) or ():
                try:
                    h.update(type(cell.cell_contents).__qualname__.encode())
                except ValueError:  # an empty cell
                    h.update(b"<empty>")
        inner = getattr(target, "__wrapped__", None)
        fn = inner if inner is not target else None
        seen += 1
    return h.hexdigest()


def _code_bytes(code: types.CodeType, depth: int) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            # Nested functions: their repr holds a memory address; hash their content.
            parts.append(_code_bytes(const, depth + 1) if depth < 8 else b"<deep>")
        else:
            parts.append(_canonical(const).encode())
    return b"|".join(parts)


def _canonical(const: Any) -> str:
    """A constant's repr that does not depend on the process (sets print in hash order)."""
    if isinstance(const, frozenset):
        return "frozenset(" + ",".join(sorted(_canonical(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_canonical(c) for c in const) + ")"
    return repr(const)
