"""The options of ``trainguard.watch``, as one validated dataclass.

``watch(model, optimizer, ledger="run.db", budget=0.02)`` and
``watch(model, optimizer, options=WatchOptions(ledger="run.db", budget=0.02))``
are the same call.  Every option is checked when the dataclass is built, and
all problems are reported together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

from trainguard.errors import UsageError
from trainguard.monitor.alerts import Alert

if TYPE_CHECKING:
    from trainguard.ledger import Ledger
    from trainguard.signing.keys import PrivateKey, PublicKey

OnAlert: TypeAlias = Literal["record", "stop"]
OnHang: TypeAlias = Literal["record", "abort"]
AlertHandler: TypeAlias = Callable[[Alert], None]
KeyPath: TypeAlias = "str | os.PathLike[str]"


class Scheduler(Protocol):
    """What the guard reads from a learning-rate scheduler (any ``torch.optim.lr_scheduler``)."""

    def get_last_lr(self) -> list[float]: ...

    def state_dict(self) -> dict[str, Any]: ...


class DataLoader(Protocol):
    """What the guard reads from a data loader (``torch.utils.data.DataLoader``)."""

    dataset: Any
    sampler: Any
    batch_sampler: Any


@dataclass(frozen=True)
class WatchOptions:
    """Every option of ``watch``; docs/watch.md describes each."""

    ledger: Ledger | KeyPath | None = None
    run_id: str | None = None
    # Several optimizers: one scheduler per optimizer that has one, in any order.
    scheduler: Scheduler | Sequence[Scheduler] | None = None
    dataloader: DataLoader | None = None
    # The criterion (a torch.nn.Module: nn.CrossEntropyLoss(...)): its settings and buffers
    # are held like the model's (checks/lossfn.py; label_smoothing, ignore_index, weight).
    loss_fn: Any = None
    # Exact mode: full fingerprints at every ``every``-th boundary; a budget (a fraction of
    # the step time) switches to sampled checks (monitor/budget.py).
    every: int = 1
    budget: float | None = None
    # False: the loop passes guard.step(grad_norm=...), which saves a pass over the gradients.
    measure_grad_norm: bool = True
    # "per_tensor": the loop clips parameter subsets separately (monitor/gradfactor.py)
    grad_clipping: Literal["global", "per_tensor"] = "global"
    # "varying": the loop divides the gradients by a factor that changes per step (tokens
    # in the batch); grad_transform: its own transform fn(name, param, grad), which the
    # guard re-applies to a copy of backward's gradient (monitor/gradtransform.py)
    grad_scaling: Literal["fixed", "varying"] = "fixed"
    grad_transform: Callable[[str, Any, Any], Any] | None = None
    # The run's own tensor subclasses (torchao's, bitsandbytes' Params4bit, a library's
    # batch class): their tensors may carry the run, held by the code they run at
    # watch() (monitor/tensortypes.py); any other class not torch's own is TG1321.
    tensor_types: Sequence[type] = ()
    key: bytes | None = None
    on_alert: OnAlert | AlertHandler = "record"
    data_check: bool = False
    sync_every: int = 50
    min_stall_seconds: float = 0.1
    rank: int | None = None
    world_size: int | None = None
    # Signing of this rank's ledger heads, every ``sign_every`` steps and at close, so a
    # stream cut short or rewritten shows.  None (the default): a fresh Ed25519 key per
    # rank, in memory only, its public half in the run-start record; a private key
    # (object or PEM path): that key instead; False: no signing (verify says unsigned).
    sign_key: PrivateKey | KeyPath | Literal[False] | None = None
    sign_every: int = 100
    # Where to write the per-run private key (mode 0600; "{rank}" is replaced by the
    # rank, else ".rank{N}" is added when there are several ranks): a mount off the
    # training host.  Never written unless asked.
    run_key_out: KeyPath | None = None
    # The anchor file rank 0 appends its run key id to at start (ledger/anchorfile.py),
    # outside the ledger, so ledger verify can pin the key: None: $TRAINGUARD_ANCHORS or
    # the user's state dir; a path; False: none.
    anchors: KeyPath | Literal[False] | None = None
    env_snapshot: KeyPath | None = None
    env_key: PublicKey | KeyPath | None = None
    env_paths: list[str] | None = None
    # Per-tensor digests in each step record let `trainguard replay` name diverging tensors.
    tensor_digests: bool = True
    hang_seconds: float | None = 300.0
    hang_factor: float = 20.0
    on_hang: OnHang | AlertHandler = "record"
    hang_stacks: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            problems.append(
                f"budget must be a fraction of the step time in (0, 1], not {self.budget}"
            )
        if self.every < 1:
            problems.append(f"every must be 1 or more, not {self.every}")
        if self.loss_fn is not None and not hasattr(self.loss_fn, "register_forward_pre_hook"):
            problems.append(f"loss_fn must be a torch.nn.Module, not {type(self.loss_fn).__name__}")
        if self.grad_clipping not in ("global", "per_tensor"):
            problems.append(
                f"grad_clipping is 'global' or 'per_tensor', not {self.grad_clipping!r}"
            )
        if self.grad_scaling not in ("fixed", "varying"):
            problems.append(f"grad_scaling is 'fixed' or 'varying', not {self.grad_scaling!r}")
        elif self.grad_scaling == "varying" and self.grad_clipping == "per_tensor":
            # a factor per tensor under a varying one is any positive factor per tensor:
            # nothing left to verify (a grad_transform can say what the loop does)
            problems.append("grad_scaling='varying' and grad_clipping='per_tensor' together")
        if self.grad_transform is not None and not callable(self.grad_transform):
            problems.append("grad_transform must be a function fn(name, param, grad)")
        if isinstance(self.tensor_types, (str, bytes)) or not all(
            isinstance(c, type) for c in self.tensor_types
        ):
            problems.append("tensor_types must be a list of tensor classes")
        if self.sign_every < 1:
            problems.append(f"sign_every must be 1 or more, not {self.sign_every}")
        if isinstance(self.sign_key, bool) and self.sign_key:  # typed out, passed anyway
            problems.append("sign_key must be a private key, a PEM path, None or False")
        if self.run_key_out is not None and self.sign_key is not None:
            problems.append("run_key_out writes the per-run key: it needs sign_key=None")
        if isinstance(self.anchors, bool) and self.anchors:
            problems.append("anchors must be a path, None or False")
        if self.run_key_out is not None and self.ledger is None:
            problems.append("run_key_out needs a ledger (without one nothing is signed)")
        if not callable(self.on_alert) and self.on_alert not in ("record", "stop"):
            problems.append(
                f"on_alert must be 'record', 'stop' or a callable, not {self.on_alert!r}"
            )
        if not callable(self.on_hang) and self.on_hang not in ("record", "abort"):
            problems.append(
                f"on_hang must be 'record', 'abort' or a callable, not {self.on_hang!r}"
            )
        if self.hang_seconds is not None and not self.hang_seconds > 0:
            problems.append("hang_seconds must be a positive number of seconds (or None)")
        if not self.hang_factor >= 0:
            problems.append("hang_factor must be zero or more")
        if self.env_snapshot is not None and self.env_key is None:
            problems.append("env_snapshot needs env_key (the snapshot's public key)")
        if self.min_stall_seconds < 0:
            problems.append("min_stall_seconds must be zero or more")
        if problems:
            raise UsageError("watch: " + "; ".join(problems))

    @classmethod
    def from_kwargs(cls, options: WatchOptions | None, kwargs: Mapping[str, Any]) -> WatchOptions:
        """``options`` (or the defaults) with the keyword arguments of ``watch`` applied."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"watch: unknown option(s): {', '.join(unknown)}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base
