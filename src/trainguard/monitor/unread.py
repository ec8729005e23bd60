"""Fingerprints that survive a tensor they cannot read (red team 3, F3).

The tamper check compares the weights and the optimizer's state between two
steps.  Taken whole, one tensor that raises when read (a ``torch.Tensor``
subclass whose ``__torch_function__`` raises, put into ``optimizer.state``; a
state slot whose key or value trips on attribute access) made the whole
comparison raise: the step's weight edit went unseen behind one medium note, and
the after-step fingerprint became the next baseline.  So a comparison is never
all or nothing: when taking a fingerprint whole raises, it is taken tensor by
tensor (and the optimizer's state listed slot by slot); a tensor that cannot be
read gets a digest that equals nothing, so it is named changed (unverified,
never "clean"), and every other tensor is compared as ever.  Only the failing
path pays: the common case is one ``fingerprint`` call, as before.  What the tamper
check says about such tensors, and about a comparison that did not complete at all,
is here too (:func:`recompare`).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.fingerprint import Fingerprint, Fingerprinter
from trainguard.monitor.fingerprint import optimizer_tensors as _all_state
from trainguard.monitor.kinds import Unchecked, dense_parts
from trainguard.monitor.sharding import is_dtensor, shard, state_owner

UNREAD = "unread "  # the start of an unreadable tensor's digest (the rest is random)


class Unread:
    """A watched entry that could not be listed: it stands in for its tensors."""

    def __init__(self, why: str) -> None:
        self.why = why


def why(e: BaseException) -> str:
    """The exception, short, even when its own ``__str__`` raises."""
    try:
        return f"{type(e).__name__}: {str(e)[:120]}"
    except Exception:
        return type(e).__name__


def take(fp: Fingerprinter, named: list[tuple[str, Any]], unread: dict[str, str]) -> Fingerprint:
    """``fp.fingerprint(named)``; when that raises, tensor by tensor: one that cannot be
    read (or an :class:`Unread` entry) is added to ``unread`` with its reason, under a
    random digest.  The group digests are those ``fingerprint`` gives when all is read."""
    if not any(isinstance(t, Unread) for _, t in named):
        try:
            return fp.fingerprint(named)
        except Exception:  # noqa: S110 - read again tensor by tensor below
            pass
    per: list[tuple[str, str]] = []
    plain_per: list[tuple[str, str]] = []
    for name, t in named:
        try:
            if isinstance(t, Unread):
                unread[name] = t.why
                raise LookupError(t.why)
            one = fp.fingerprint([(name, t)])
        except Exception as e:
            unread.setdefault(name, why(e))
            nonce = UNREAD + secrets.token_hex(8)  # equal to nothing: the tensor is unverified
            per.append((name, nonce))
            plain_per.append((name, nonce))
            continue
        per += one.per_tensor
        plain_per += one.plain_per_tensor
    group = hashlib.blake2b(key=fp.key[:32], digest_size=16)
    plain = hashlib.blake2b(digest_size=16)
    for (name, d), (_, p) in zip(per, plain_per, strict=True):
        group.update(f"{name}={d};".encode())
        plain.update(f"{name}={p};".encode())
    return Fingerprint(group.hexdigest(), tuple(per), plain.hexdigest(), tuple(plain_per))


def state(optimizer: Any, skipped: Unchecked) -> list[tuple[str, Any]]:
    """The optimizer's state tensors as the tamper check names them (dense parts); when
    listing them whole raises, slot by slot, a slot that cannot be listed as an
    :class:`Unread` entry named by its parameter and position."""
    try:
        return dense_parts(_all_state(optimizer), skipped)
    except Exception:  # noqa: S110 - listed again slot by slot below
        pass
    import torch

    try:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        items = list(state_owner(optimizer).state.items())
    except Exception as e:
        return [("optimizer state", Unread(why(e)))]
    out: list[tuple[str, Any]] = []
    for p, slots in items:
        i = index.get(id(p), "?")
        try:
            listed = list(slots.items())
        except Exception as e:
            out.append((f"{i}.*", Unread(why(e))))
            continue
        for n, (slot, value) in enumerate(listed):
            try:
                if not isinstance(value, torch.Tensor):
                    continue
                name = f"{i}.{slot}"
                if is_dtensor(value):
                    s = shard(name, value)
                    name, value = s.label, s.local
                out += dense_parts([(name, value)], skipped)
            except Exception as e:
                out.append((f"{i}.#{n}", Unread(why(e))))
    return out


def note(unread: dict[str, str], changed: list[str]) -> str:
    """The part of an alert's message naming the changed tensors that could not be read."""
    names = [n for n in changed if n in unread]
    if not names:
        return ""
    said = ", ".join(f"{n} ({unread[n]})" for n in names[:3])
    return f"; {len(names)} could not be read (unverified): {said}"


def evidence(unread: dict[str, str], changed: list[str]) -> dict[str, Any]:
    names = [n for n in changed if n in unread]
    return {"unread": {n: unread[n] for n in names[:50]}} if names else {}


def recompare(
    ctx: Context,
    gap: tuple[int, Fingerprint, Fingerprint],
    written: set[str],
    before: Fingerprint,
    opt_before: Fingerprint,
) -> list[Alert]:
    """After a boundary whose comparison did not complete (it raised), the weights and
    state now against the last *verified* state (``gap``: the failed step, the weights
    and state as the step before it left them): what did not change is verified after
    all; a weight no optimizer step wrote since (``written``: those with a gradient at
    those steps) that changed is an edit (TG1301); the rest changed unverified (TG1315
    high: the optimizer's update or an edit, no longer told apart)."""
    step, after, opt_after = gap
    moved = before.changed(after) if before.digest != after.digest else []
    edited = [n for n in moved if n.split("[")[0] not in written]
    unsure = [n for n in moved if n.split("[")[0] in written]
    if opt_before.digest != opt_after.digest:
        unsure += ["optimizer " + n for n in opt_before.changed(opt_after)]
    since = f"since the last verified state (before step {step}, whose comparison failed)"
    alerts = []
    if edited:
        alerts.append(
            ctx.alert(
                "TG1301",
                f"{len(edited)} parameter tensor(s) changed {since}, which no optimizer "
                f"step wrote (no gradient): {', '.join(edited[:5])}",
                tensors=edited[:50],
                unverified_from=step,
            )
        )
    if unsure:
        alerts.append(
            ctx.alert(
                "TG1315",
                f"{len(unsure)} tensor(s) changed {since}: the optimizer's update or an "
                f"edit, not told apart: {', '.join(unsure[:5])}",
                severity=Severity.HIGH,
                tensors=unsure[:50],
                unverified_from=step,
            )
        )
    return alerts
