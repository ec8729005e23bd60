"""The Hugging Face Trainer callback on a real (tiny) Trainer run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: Any, y: Any) -> dict[str, Any]:
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), y)}


def _trainer(tmp_path: Path, callback: Any, steps: int = 40) -> Any:
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
    return transformers.Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[callback])


def test_trainer_run_is_watched_and_clean(tmp_path: Path) -> None:
    from trainguard.watch.integrations import HFWatchCallback

    cb = HFWatchCallback()
    _trainer(tmp_path, cb).train()
    assert cb.guard is not None and cb.guard.step_index == 40
    assert cb.guard.alerts == []


def test_trainer_tampering_is_caught(tmp_path: Path) -> None:
    from trainguard.watch.integrations import HFWatchCallback

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
