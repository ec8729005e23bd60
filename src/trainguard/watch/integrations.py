"""Callbacks that watch Hugging Face Trainer and PyTorch Lightning runs.

Both create the guard when training starts (when the model and optimizer
exist) and call ``guard.step`` after every optimizer step, so users add one
callback and nothing else.  The frameworks are imported only when a callback
is created; without them a clear MissingExtraError says what to install.
"""

from __future__ import annotations

from typing import Any

from trainguard.errors import MissingExtraError
from trainguard.watch.guard import Guard


def HFWatchCallback(**guard_kwargs: Any) -> Any:
    """A ``transformers.TrainerCallback`` that watches the Trainer's run.

    ``trainer.add_callback(HFWatchCallback(ledger="run.sqlite"))``; the guard is
    then ``callback.guard``.
    """
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise MissingExtraError("transformers", "hf", "watching a Trainer") from exc

    class _Callback(TrainerCallback):
        def __init__(self) -> None:
            self.guard: Guard | None = None
            self._last_loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model, optimizer = kw.get("model"), kw.get("optimizer")
            if model is None or optimizer is None:
                raise RuntimeError("trainguard: the Trainer gave no model or optimizer")
            self.guard = Guard(
                model,
                getattr(optimizer, "optimizer", optimizer),
                scheduler=kw.get("lr_scheduler"),
                **guard_kwargs,
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self._last_loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.guard is not None:
                self.guard.step(loss=self._last_loss)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.guard is not None:
                self.guard.close()

    return _Callback()


def LightningWatchCallback(**guard_kwargs: Any) -> Any:
    """A ``lightning.pytorch.Callback`` (or ``pytorch_lightning``) watching the run."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise MissingExtraError("lightning", "lightning", "watching a Lightning run") from exc

    class _Callback(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.guard: Guard | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0]
            schedulers = getattr(trainer, "lr_scheduler_configs", None) or []
            scheduler = schedulers[0].scheduler if schedulers else None
            self.guard = Guard(pl_module, optimizer, scheduler=scheduler, **guard_kwargs)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if self.guard is None:
                return
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.guard.step(loss=loss, batch=batch)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.guard is not None:
                self.guard.close()

    return _Callback()
