"""An HF Trainer's loss is held from the start of training (red team s5 H, issue #12).

Red team s5: a library found the Trainer and added a callback that, from step 10, set
``trainer.compute_loss_func`` (label smoothing 0.4 on even steps): no hook, no patched
name, the model and optimizer untouched, and nothing alerted.  ``HFWatchCallback`` now
holds the Trainer's ``compute_loss_func``, a ``compute_loss`` set on the instance, its
label smoother, its callback list and the arguments the loss reads from
``on_train_begin`` (monitor/upstream.py).  Generated: which of them a planted callback
changes, and at which step: TG1304 critical at that step.  The honest run is
tests/test_watch_integrations.py's (no alert at all).  Seed printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.integrations import HFWatchCallback  # noqa: E402

STEPS = 12


class Tiny(torch.nn.Module):  # type: ignore[name-defined,misc]  # torch is importorskip-ed (Any)
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: Any, y: Any) -> dict[str, Any]:
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), y)}


class Plant(transformers.TrainerCallback):  # type: ignore[name-defined,misc]  # Any
    """A library's callback: at step ``at`` it changes ``kind`` on the Trainer."""

    def __init__(self, trainer: Any, kind: str, at: int) -> None:
        self.trainer, self.kind, self.at = trainer, kind, at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at:
            change(self.kind, self.trainer)


def trainer_for(folder: Path, callback: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(folder / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[callback])


def _loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    return outputs["loss"] * 0.5


def change(kind: str, trainer: Any) -> None:
    if kind == "compute_loss_func":
        trainer.compute_loss_func = _loss
    elif kind == "compute_loss":
        original = trainer.compute_loss
        trainer.compute_loss = lambda *a, **k: original(*a, **k)
    elif kind == "label_smoother":
        from transformers.trainer_pt_utils import LabelSmoother

        trainer.label_smoother = LabelSmoother(epsilon=0.4)
    elif kind == "args":
        trainer.args.label_smoothing_factor = 0.4
    else:
        trainer.callback_handler.callbacks.append(transformers.TrainerCallback())


def test_a_change_to_the_trainers_loss_is_named_at_its_step(tmp_path: Path) -> None:
    rng = seeded()
    kinds = ["compute_loss_func", "compute_loss", "label_smoother", "args", "callback"]
    for i in range(2):
        kind, at = rng.choice(kinds), rng.randrange(2, STEPS - 1)
        print("change", kind, "at", at)
        cb = HFWatchCallback(hang_seconds=None)
        trainer = trainer_for(tmp_path / str(i), cb)
        trainer.add_callback(Plant(trainer, kind, at))
        trainer.train()
        found = [
            (a.rule, a.step, a.severity) for a in cb.guard.alerts if a.severity >= Severity.HIGH
        ]
        assert found and found[0] == ("TG1304", at, Severity.CRITICAL), (kind, at, cb.guard.alerts)
