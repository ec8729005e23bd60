"""The watch checks: one class per concern (see ``base.py`` for the phases)."""

from __future__ import annotations

from typing import Any

from trainguard.monitor.checks.advance import AdvanceCheck
from trainguard.monitor.checks.averaged import AveragedCheck
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.checks.buffers import BufferCheck
from trainguard.monitor.checks.data import SampleCheck
from trainguard.monitor.checks.draws import DrawCheck
from trainguard.monitor.checks.interception import checks as interception_checks
from trainguard.monitor.checks.loader import LoaderPathCheck
from trainguard.monitor.checks.outputgrad import OutputGradientCheck
from trainguard.monitor.checks.params import ParameterIdentityCheck
from trainguard.monitor.checks.reducer import ReducerCheck
from trainguard.monitor.checks.scheduling import SchedulingCheck
from trainguard.monitor.checks.settings import SettingsCheck
from trainguard.monitor.checks.sleep import SleepCheck
from trainguard.monitor.checks.spikes import SpikeCheck
from trainguard.monitor.checks.state import StateModelCheck
from trainguard.monitor.checks.surface import SurfaceCheck
from trainguard.monitor.checks.timing import StallCheck
from trainguard.monitor.checks.tracing import TracingCheck
from trainguard.monitor.checks.transient import TransientCheck
from trainguard.monitor.checks.update import UpdateModelCheck
from trainguard.monitor.clock import OtherThreads
from trainguard.monitor.fingerprint import Fingerprinter
from trainguard.monitor.forwards import ForwardWatch
from trainguard.monitor.stats import RobustWindow

__all__ = ["Check", "StepEnd", "behaviour", "loader_draws"]


def behaviour(
    model: Any,
    optimizer: Any,
    fp: Fingerprinter,
    windows: dict[str, RobustWindow],
    *,
    min_stall_seconds: float,
    dataloader: Any = None,
    owned: Any = None,
) -> list[Check]:
    """The checks of what training does (after the guard's own tamper and identity checks).
    ``owned``: the parameters this optimizer answers for, when several optimizers share
    the model (monitor/optimizers.py), as an object with ``named_parameters()``."""
    named = list(model.named_parameters())
    update = UpdateModelCheck(named, optimizer, fp.key)
    # When the model's forward runs (hooks on the root module): checks of what may change
    # only inside it, and of what must not change while it runs.
    forwards = ForwardWatch(model)
    found: list[Check] = [
        ParameterIdentityCheck(owned if owned is not None else model, optimizer),
        StateModelCheck(update, fp.key),  # before `update`: it reads the samples update drops
        update,
        SurfaceCheck(fp.key, forwards=forwards),
    ]
    others = OtherThreads()  # read once per step for both
    stall = StallCheck(windows["time"], min_stall_seconds, others=others)
    found += [stall, SleepCheck(min_stall_seconds, others)]
    # The process's own scheduling: contention it makes itself is no busy machine.
    found += [SchedulingCheck()]
    found += [SpikeCheck(windows["loss"], windows["grad_norm"])]
    # Modes, saved-tensor hooks, kernels and AccumulateGrad hooks (below Python names).
    found += interception_checks(named, fp.key)
    # Hooks put on the model's output during a step: its gradient is the loss's.
    found += [OutputGradientCheck(forwards, fp.key)]
    # Trace and profile functions, gc callbacks: called at every frame, no attribute.
    found += [TracingCheck()]
    # Training state outside the fingerprints: buffers and module settings change only
    # inside forward (hooks on the root module say when), torch's generator only advances.
    found += [BufferCheck(model, fp, forwards), SettingsCheck(model, forwards), AdvanceCheck()]
    # Weights and training flags right at every step hook and wrong while forward runs.
    found += [
        TransientCheck(model, forwards, fp.key, several=owned is not None and owned is not model)
    ]
    # DDP: its comm hooks and bucket settings, and that it averaged the local gradients.
    found += [ReducerCheck(model), AveragedCheck(model, fp.key, forwards)]
    return found + ([SampleCheck(fp, dataloader)] if dataloader is not None else [])


def loader_draws(dataloader: Any) -> list[Check]:
    """The checks of the data loader's private generators and of the objects on its path
    (with or without data_check)."""
    if dataloader is None:
        return []
    return [DrawCheck(dataloader), LoaderPathCheck(dataloader)]
