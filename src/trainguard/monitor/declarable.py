"""The names ``guard.step(changed=...)`` accepts, so that a typo is an error, not silence.

A declaration that names nothing the checks know (``changed=["drop.pp"]``,
``["0.weight"]`` for a freeze) used to be accepted and ignored: the loop believed its
change declared, and the real change still alerted (or, worse, the user stopped reading
the alerts).  Every name a check matches a change against is one of:

* a module setting, ``"<module>.<attribute>"`` (a public instance attribute or a child
  module's slot), its training flag ``"<module>.training"`` or ``"training"`` for all,
  DDP's ``require_backward_grad_sync`` (checks/settings.py, checks/transient.py);
* a buffer or plain tensor attribute, ``"<module>.<name>"`` (checks/buffers.py);
* the criterion's, the same under ``"loss_fn."`` (checks/lossfn.py);
* a data loader path, ``"dataloader.<path>"`` (checks/loader.py), ``"scheduler"``
  (checks/scheduler.py), ``"weights"`` (checks/transient.py);
* a parameter frozen mid-run, ``"<param>.requires_grad"`` or ``"requires_grad"``
  (monitor/frozen.py).

Names are taken from the model as it is now (an attribute the loop just added is a
setting it may declare).  A name outside them raises :class:`UsageError` with the
nearest names and the forms that can be declared.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor.checks.loader import PATHS
from trainguard.monitor.checks.lossfn import NAME as LOSS_FN
from trainguard.monitor.checks.settings import SYNC
from trainguard.monitor.forwards import declared_names
from trainguard.monitor.frozen import ALL, SUFFIX

FIXED = ("training", "scheduler", "weights", ALL, SYNC)
FORMS = (
    "'<module>.<attribute>' (a module setting or buffer), '<module>.training' or "
    "'training', 'loss_fn.<attribute>', 'dataloader.<path>', 'scheduler', "
    "'<parameter>.requires_grad' or 'requires_grad' (a freeze)"
)


def _module_names(root: Any, prefix: str) -> Iterator[str]:
    for mname, m in root.named_modules(prefix=prefix):
        dot = f"{mname}." if mname else ""
        yield f"{dot}training"
        yield f"{dot}{SYNC}"
        for k in list(vars(m)):
            if not k.startswith("_"):
                yield dot + k
        yield from (dot + k for k in list(m._modules))
        yield from (dot + k for k in list(m._buffers))
        yield from (dot + k + SUFFIX for k in list(m._parameters))


def declarable(model: Any, loss_fn: Any = None, dataloader: Any = None) -> set[str]:
    """Every name a check may match a declaration against, as the objects are now."""
    names = set(FIXED)
    if hasattr(model, "named_modules"):
        names.update(_module_names(model, ""))
    if loss_fn is not None and hasattr(loss_fn, "named_modules"):
        names.update(_module_names(loss_fn, LOSS_FN))
    if dataloader is not None:
        names.update(f"dataloader.{p}" for p in PATHS)
    return names


def check(changed: Any, model: Any, loss_fn: Any = None, dataloader: Any = None) -> None:
    """Raise :class:`UsageError` when ``changed`` names something no check knows."""
    if changed is None:
        return
    try:
        said = declared_names(changed)
    except Exception as e:  # not a name, a list of names or a mapping
        raise UsageError(f"guard.step(changed=...) takes names or a mapping: {e}") from e
    if not said:
        return
    known = declarable(model, loss_fn, dataloader)
    unknown = [n for n in said if n not in known]
    if not unknown:
        return
    hints = []
    for n in unknown[:5]:
        near = difflib.get_close_matches(n, sorted(known), n=3, cutoff=0.6)
        if n + SUFFIX in known:  # a parameter named for a freeze: the form that declares it
            near = [n + SUFFIX, *(m for m in near if m != n + SUFFIX)][:3]
        hints.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, near))}?)" if near else ""))
    raise UsageError(
        f"guard.step(changed=...) names what no check knows: {'; '.join(hints)}. "
        f"Names that can be declared: {FORMS}"
    )
