"""The loss module's settings and buffers (``watch(..., loss_fn=criterion)``: TG1318, TG1317).

What the loop minimises is the criterion's business as much as the model's:
``CrossEntropyLoss.label_smoothing = 0.6`` or ``ignore_index = 2`` (a class
never trained), a class ``weight`` set to ``[1, 1, 0.01, 1]``,
``BCEWithLogitsLoss.pos_weight``.  Red team 4 (A03b/c) changed them mid-run and
nothing alerted: the criterion is no part of the model.  The invariant is the
model's own (checks/settings.py, checks/buffers.py): a module's settings and
buffers change only inside its forward, or when the loop declares it
(``guard.step(changed={"loss_fn.label_smoothing": 0.1})``).  So the same two
checks watch the criterion, through forward hooks of its own.  Its names are
``loss_fn.<attribute>``: the criterion is held under that name in a container
module made for the checks (the criterion itself is not changed, and keeps no
reference to it).

A loss computed by a function (``F.cross_entropy(..., label_smoothing=ls)``)
has no module to watch: its arguments are the loop's code.
"""

from __future__ import annotations

from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor.checks.base import Check
from trainguard.monitor.checks.buffers import BufferCheck
from trainguard.monitor.checks.settings import SettingsCheck
from trainguard.monitor.fingerprint import Fingerprinter
from trainguard.monitor.forwards import ForwardWatch

NAME = "loss_fn"  # the prefix of the criterion's settings and buffers in alerts


def loss_checks(loss_fn: Any, fp: Fingerprinter) -> list[Check]:
    """The settings and buffer checks of the criterion (none when not given)."""
    if loss_fn is None:
        return []
    import torch

    if not isinstance(loss_fn, torch.nn.Module):
        raise UsageError(
            f"loss_fn must be a torch.nn.Module (a criterion such as nn.CrossEntropyLoss), "
            f"not {type(loss_fn).__name__}: a loss function's arguments are the loop's code"
        )
    holder = torch.nn.Module()
    holder.add_module(NAME, loss_fn)  # names: loss_fn.label_smoothing, loss_fn.weight
    forwards = ForwardWatch(loss_fn)  # the criterion's own forward: when it may change
    return [SettingsCheck(holder, forwards), BufferCheck(holder, fp, forwards)]
