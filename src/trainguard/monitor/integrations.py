"""Callbacks that watch Hugging Face Trainer and PyTorch Lightning runs.

Both create the guard when training starts (when the model and optimizer
exist) and call ``guard.step`` after every optimizer step, so users add one
callback and nothing else.  Evaluation between steps counts as progress for
the guard's watchdog.  The frameworks are imported only when a callback is
created; without them a clear MissingExtraError says what to install.
"""

from __future__ import annotations

import sys
from typing import Any

from trainguard.errors import MissingExtraError
from trainguard.monitor import upstream
from trainguard.monitor.guard import Guard


def HFWatchCallback(**guard_kwargs: Any) -> Any:
    """A ``transformers.TrainerCallback`` that watches the Trainer's run.

    ``trainer.add_callback(HFWatchCallback(ledger="run.sqlite"))``; the guard is
    then ``callback.guard``.
    """
    try:
        from transformers import Trainer, TrainerCallback
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
            # The loss is the Trainer's (compute_loss_func, compute_loss, its callbacks),
            # no part of the model: held from here like the model's code (upstream.py).
            trainer = upstream.find_trainer(sys._getframe(1), Trainer)
            if trainer is None:
                raise RuntimeError(
                    "trainguard: the Trainer that started training was not found "
                    "(its loss function could not be held)"
                )
            self.guard.identity.hold(upstream.trainer_routes(trainer))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self._last_loss = float(logs["loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.guard is not None:
                self.guard.step(loss=self._last_loss)

        # Evaluation and saving run between two steps: progress, not a hang.
        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _touch(self.guard)

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _touch(self.guard)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _touch(self.guard)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.guard is not None:
                self.guard.close()

    return _Callback()


def LightningWatchCallback(**guard_kwargs: Any) -> Any:
    """A PyTorch Lightning ``Callback`` that watches the run.

    ``Trainer(callbacks=[LightningWatchCallback(ledger="run.sqlite")])``; the guard
    is then ``callback.guard``.  It is a callback of ``pytorch_lightning`` and of
    ``lightning.pytorch``, whichever are installed, so either Trainer accepts it.
    Every optimizer is watched (several: manual optimization, a GAN's generator and
    discriminator; each is a lane of the guard, monitor/optimizers.py), each scheduler
    with the optimizer it steps.
    """
    bases = _lightning_callback_classes()
    if not bases:
        raise MissingExtraError("pytorch_lightning", "lightning", "watching a Lightning run")

    class _Callback(*bases):  # type: ignore[misc]
        def __init__(self) -> None:
            self.guard: Guard | None = None
            self._closed = False

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizers = list(trainer.optimizers)
            configs = getattr(trainer, "lr_scheduler_configs", None) or []
            schedulers = [c.scheduler for c in configs]
            given: Any = optimizers
            scheduler: Any = schedulers or None
            if len(optimizers) == 1:
                given, scheduler = optimizers[0], schedulers[0] if schedulers else None
            self.guard = Guard(pl_module, given, scheduler=scheduler, **guard_kwargs)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            # With gradient accumulation most batches end without an optimizer
            # step; the guard counts optimizer steps.
            if self.guard is None or self.guard._pending is None:
                return
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.guard.step(loss=loss, batch=batch)

        # Validation runs between two steps: progress, not a hang.
        def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            _touch(self.guard)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            _touch(self.guard)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._close(None)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._close(exception)

        def _close(self, error: BaseException | None) -> None:
            if self.guard is not None and not self._closed:
                self._closed = True
                self.guard.close(error)

    return _Callback()


def _lightning_callback_classes() -> tuple[type, ...]:
    found: list[type] = []
    try:
        from pytorch_lightning import Callback as PLCallback

        found.append(PLCallback)
    except ImportError:
        pass
    try:
        from lightning.pytorch import Callback as LCallback

        found.append(LCallback)
    except ImportError:
        pass
    return tuple(found)


def _touch(guard: Guard | None) -> None:
    if guard is not None and guard.watchdog is not None:
        guard.watchdog.touch()
