"""The framework callbacks on real (tiny) runs: a Hugging Face Trainer and a Lightning Trainer.

Each honest run raises nothing; each sabotage is caught by its rule at the step
that first observes it (a change made after step k is reported at step k + 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")


# -- Hugging Face ----------------------------------------------------------------------


def _hf() -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


class TinyHF(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: Any, y: Any) -> dict[str, Any]:
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), y)}


def _trainer(tmp_path: Path, callback: Any, steps: int = 40) -> Any:
    transformers = _hf()
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=TinyHF(), args=args, train_dataset=data, callbacks=[callback])


def test_trainer_run_is_watched_and_clean(tmp_path: Path) -> None:
    _hf()
    from trainguard.monitor.integrations import HFWatchCallback

    cb = HFWatchCallback()
    _trainer(tmp_path, cb).train()
    assert cb.guard is not None and cb.guard.step_index == 40
    assert cb.guard.alerts == []


def test_trainer_tampering_is_caught(tmp_path: Path) -> None:
    transformers = _hf()
    from trainguard.monitor.integrations import HFWatchCallback

    cb = HFWatchCallback()

    class Tamper(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(
            self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
        ) -> None:
            if state.global_step == 20:
                with torch.no_grad():
                    model.lin.bias.add_(0.5)

    trainer = _trainer(tmp_path, cb)
    trainer.add_callback(Tamper())
    trainer.train()
    assert cb.guard is not None
    assert [(a.rule, a.step) for a in cb.guard.alerts] == [("TG1301", 20)]


# -- PyTorch Lightning -------------------------------------------------------------------


def _pl() -> Any:
    return pytest.importorskip("pytorch_lightning")


def _module(optimizer: str = "sgd", flip_at: int | None = None) -> Any:
    """A one-layer LightningModule; ``flip_at``: its gradient clipping flips the
    gradients' sign at that step (the incident's sabotage)."""
    pl = _pl()

    class Tiny(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            if self.global_step == flip_at:
                for p in self.parameters():
                    p.grad.neg_()
            elif gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

        def configure_optimizers(self) -> Any:
            if optimizer == "sgd":  # plain SGD: the update follows this step's gradient
                return torch.optim.SGD(self.parameters(), lr=0.05)
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Tiny()


def _loader(n: int, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(tmp_path: Path, module: Any, callbacks: list[Any], *, n: int, **trainer_kw: Any) -> None:
    pl = _pl()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **trainer_kw,
    )
    trainer.fit(module, _loader(n), val_dataloaders=_loader(16, seed=1))


def _ledger_alerts(path: Path, run_id: str) -> list[tuple[str, int | None]]:
    from trainguard.ledger import open_ledger

    ledger = open_ledger(str(path), create=False)
    try:
        return [(r.payload["rule"], r.step) for r in ledger.records(run_id) if r.kind == "alert"]
    finally:
        ledger.close()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lightning_honest_run_is_watched_and_clean(tmp_path: Path, optimizer: str) -> None:
    from trainguard.ledger import open_ledger
    from trainguard.monitor.integrations import LightningWatchCallback

    ledger = tmp_path / "runs.sqlite"
    cb = LightningWatchCallback(ledger=ledger, run_id="pl-clean")
    # Three epochs of 8 steps with validation after each; AdamW with clipping and a
    # per-step scheduler that the guard must tell apart from a tampered learning rate.
    clip = 0.5 if optimizer == "adamw" else None
    _fit(tmp_path, _module(optimizer), [cb], n=64, max_epochs=3, gradient_clip_val=clip)
    assert cb.guard is not None and cb.guard.step_index == 24
    assert cb.guard.alerts == []
    with open_ledger(str(ledger), create=False) as opened:
        kinds = [r.kind for r in opened.records("pl-clean", 0)]
    assert kinds.count("step") == 24
    # Signed by default: the stream ends with its final signed head after the run-end.
    assert kinds[0] == "run-start" and kinds[-2:] == ["run-end", "head"]
    assert cb.guard.watchdog is not None and not cb.guard.watchdog._thread.is_alive()


def test_lightning_weights_tampered_between_steps(tmp_path: Path) -> None:
    pl = _pl()
    from trainguard.monitor.integrations import LightningWatchCallback

    class Tamper(pl.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step == 21:  # after step 20 (global_step counts steps done)
                with torch.no_grad():
                    module.lin.bias.add_(1e-3)

    ledger = tmp_path / "runs.sqlite"
    cb = LightningWatchCallback(ledger=ledger, run_id="pl-tamper")
    _fit(tmp_path, _module(), [cb, Tamper()], n=320, max_steps=40)
    assert cb.guard is not None and cb.guard.step_index == 40
    assert [(a.rule, a.step) for a in cb.guard.alerts] == [("TG1301", 21)]
    assert cb.guard.alerts[0].evidence["tensors"] == ["lin.bias"]
    assert _ledger_alerts(ledger, "pl-tamper") == [("TG1301", 21)]


def test_lightning_optimizer_step_patched_mid_run(tmp_path: Path) -> None:
    pl = _pl()
    from trainguard.monitor.integrations import LightningWatchCallback

    class Patch(pl.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step == 11:  # after step 10
                opt = trainer.optimizers[0]
                original = opt.step

                def step(*a: Any, **k: Any) -> Any:  # passes through: only the identity changed
                    return original(*a, **k)

                opt.step = step

    ledger = tmp_path / "runs.sqlite"
    cb = LightningWatchCallback(ledger=ledger, run_id="pl-patch")
    _fit(tmp_path, _module(), [cb, Patch()], n=320, max_steps=30)
    assert [(a.rule, a.step) for a in cb.guard.alerts] == [("TG1304", 11)]
    assert "optimizer.step" in cb.guard.alerts[0].evidence["functions"]
    assert _ledger_alerts(ledger, "pl-patch") == [("TG1304", 11)]


def test_lightning_flipped_clipping_is_caught_at_its_step(tmp_path: Path) -> None:
    """Lightning clips inside optimizer.step's closure; the guard checks after it."""
    from trainguard.monitor.integrations import LightningWatchCallback

    cb = LightningWatchCallback()
    _fit(tmp_path, _module(flip_at=15), [cb], n=320, max_steps=30, gradient_clip_val=1.0)
    assert [(a.rule, a.step) for a in cb.guard.alerts] == [("TG1306", 15)]
    assert "changed sign" in cb.guard.alerts[0].message


def test_lightning_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    from trainguard.monitor.integrations import LightningWatchCallback

    cb = LightningWatchCallback()
    _fit(tmp_path, _module(), [cb], n=320, max_steps=10, accumulate_grad_batches=4)
    assert cb.guard is not None and cb.guard.step_index == 10
    assert cb.guard.alerts == []


def test_lightning_callback_is_a_callback_of_the_installed_package() -> None:
    pl = _pl()
    from trainguard.monitor.integrations import LightningWatchCallback

    assert isinstance(LightningWatchCallback(), pl.Callback)


def test_lightning_hang_in_training_step_is_reported_and_validation_is_not(
    tmp_path: Path,
) -> None:
    """The watchdog through the callback: a training_step that hangs is a stall (TG1313);
    a validation loop longer than the threshold is progress, batch by batch."""
    import threading
    import time

    pl = _pl()
    from trainguard.monitor.integrations import LightningWatchCallback

    released = threading.Event()

    class Hangs(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.global_step == 30:  # hangs until the watchdog reported it (a minute at most)
                deadline = time.monotonic() + 60
                while not released.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            # Slow but alive: the whole loop takes about twice the threshold.
            time.sleep(2 * cb.guard.watchdog.hang_seconds / len(self.trainer.val_dataloaders))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    # 2 s, not less: an honest step of this tiny model on a machine at load 15 once took
    # over 0.5 s and was (rightly) a stall at step 1; the test is about where stalls are.
    cb = LightningWatchCallback(hang_seconds=2.0, on_hang=lambda alert: released.set())
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[cb],
        max_steps=40,
        num_sanity_val_steps=0,
    ).fit(Hangs(), _loader(160), val_dataloaders=_loader(160, seed=1))  # 20 steps an epoch
    stalls = [a for a in cb.guard.alerts if a.rule == "TG1313"]
    assert [a.step for a in stalls] == [30], [(a.step, a.message, a.evidence) for a in stalls]
    assert " in training_step" in stalls[0].evidence["stack"][-1]
