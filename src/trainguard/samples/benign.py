"""Clean files of the same formats, written by the genuine libraries.

A scanner's false positives are found here: each must load without error and
be reported at no more than its ``expect``.  The "medium" ones import classes
by design (an estimator, a whole module, training arguments): trustworthy only
if their author is.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

from trainguard.samples.base import benign

_TORCH = ("torch",)


def _seeded() -> Any:
    import torch

    torch.manual_seed(0)
    return torch


def _mlp() -> Any:
    nn = _seeded().nn
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _cnn() -> Any:
    nn = _seeded().nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _save(obj: object, path: Path, **kwargs: Any) -> Path:
    import torch

    torch.save(obj, path, **kwargs)
    return path


@benign(
    "torch-mlp-state-dict",
    "MLP state_dict (torch.save zip)",
    "plain tensors",
    loader="torch",
    requires=_TORCH,
)
def mlp_state(out: Path, canary: Path) -> Path:
    return _save(_mlp().state_dict(), out / "mlp.pt")


@benign(
    "torch-cnn-state-dict",
    "CNN state_dict with BatchNorm buffers",
    "tensors and an int64 num_batches_tracked buffer",
    loader="torch",
    requires=_TORCH,
)
def cnn_state(out: Path, canary: Path) -> Path:
    return _save(_cnn().state_dict(), out / "cnn.pt")


@benign(
    "torch-transformer-state-dict",
    "nn.Transformer state_dict",
    "many tensors, nested names",
    loader="torch",
    requires=_TORCH,
)
def transformer_state(out: Path, canary: Path) -> Path:
    nn = _seeded().nn
    model = nn.Transformer(
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        batch_first=True,
    )
    return _save(model.state_dict(), out / "transformer.pt")


def _training_state() -> dict[str, Any]:
    import random

    import numpy as np

    torch = _seeded()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 1,
        "step": 1,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }


@benign(
    "torch-adam-state-dict",
    "Adam optimizer state_dict",
    "exp_avg tensors and hyper-parameters",
    loader="torch",
    requires=_TORCH,
)
def adam_state(out: Path, canary: Path) -> Path:
    return _save(_training_state()["optimizer"], out / "optimizer.pt")


@benign(
    "torch-training-checkpoint",
    "Full training checkpoint",
    "model, optimizer, scheduler, epoch and torch/numpy/python RNG states",
    loader="torch",
    requires=(*_TORCH, "numpy"),
)
def training_checkpoint(out: Path, canary: Path) -> Path:
    return _save(_training_state(), out / "checkpoint.pt")


@benign(
    "torch-training-checkpoint-legacy",
    "Full training checkpoint, legacy format",
    "the same, with _use_new_zipfile_serialization=False",
    loader="torch",
    requires=(*_TORCH, "numpy"),
)
def training_checkpoint_legacy(out: Path, canary: Path) -> Path:
    return _save(
        _training_state(), out / "checkpoint_legacy.pt", _use_new_zipfile_serialization=False
    )


@benign(
    "torch-whole-module",
    "A whole nn.Module pickled by torch.save(model)",
    "imports torch.nn classes by name",
    loader="torch",
    expect="medium",
    requires=_TORCH,
)
def whole_module(out: Path, canary: Path) -> Path:
    return _save(_mlp(), out / "model_full.pt")


# -- numpy / joblib -------------------------------------------------------------


@benign("numpy-npy-float", "float32 .npy", "no pickle inside", loader="numpy", requires=("numpy",))
def npy_float(out: Path, canary: Path) -> Path:
    import numpy as np

    path = out / "embeddings.npy"
    np.save(path, np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16))
    return path


@benign(
    "numpy-npz-float",
    ".npz of numeric arrays",
    "a zip of .npy members",
    loader="numpy-npz",
    requires=("numpy",),
)
def npz_float(out: Path, canary: Path) -> Path:
    import numpy as np

    path = out / "arrays.npz"
    np.savez_compressed(path, w=np.ones((4, 4), np.float32), b=np.arange(4, dtype=np.int64))
    return path


def _joblib_arrays(out: Path, method: str | None) -> Path:
    import joblib
    import numpy as np

    path = out / (f"arrays.joblib.{method}" if method else "arrays.joblib")
    joblib.dump(
        {"w": np.ones((8, 8)), "b": np.arange(8)}, path, compress=(method, 3) if method else 0
    )
    return path


@benign(
    "joblib-numpy",
    "joblib dump of numpy arrays",
    "NumpyArrayWrapper records",
    loader="joblib",
    requires=("joblib", "numpy"),
)
def joblib_numpy(out: Path, canary: Path) -> Path:
    return _joblib_arrays(out, None)


@benign(
    "joblib-numpy-zlib",
    "zlib-compressed joblib of numpy arrays",
    "compressed stream",
    loader="joblib",
    requires=("joblib", "numpy"),
)
def joblib_numpy_zlib(out: Path, canary: Path) -> Path:
    return _joblib_arrays(out, "zlib")


@benign(
    "joblib-numpy-lz4",
    "lz4-compressed joblib of numpy arrays",
    "compressed stream",
    loader="joblib",
    requires=("joblib", "numpy", "lz4"),
)
def joblib_numpy_lz4(out: Path, canary: Path) -> Path:
    return _joblib_arrays(out, "lz4")


def _logreg() -> Any:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    return LogisticRegression().fit(x, [0, 1, 1, 0])


@benign(
    "sklearn-logreg-joblib",
    "fitted LogisticRegression, joblib",
    "imports the estimator class",
    loader="joblib",
    expect="medium",
    requires=("sklearn", "joblib", "numpy"),
)
def logreg_joblib(out: Path, canary: Path) -> Path:
    import joblib

    path = out / "logreg.joblib"
    joblib.dump(_logreg(), path)
    return path


@benign(
    "sklearn-logreg-pickle",
    "fitted LogisticRegression, pickle",
    "imports the estimator class",
    expect="medium",
    requires=("sklearn", "numpy"),
)
def logreg_pickle(out: Path, canary: Path) -> Path:
    path = out / "logreg.pkl"
    path.write_bytes(pickle.dumps(_logreg(), protocol=5))
    return path


# -- plain pickles ----------------------------------------------------------------

_DATA: dict[str, Any] = {
    "name": "run-42",
    "epoch": 12,
    "lr": 3e-4,
    "betas": (0.9, 0.999),
    "big": 2**70,
    "layers": [64, 128, 256],
    "tags": ["baseline", "fp32"],
    "done": False,
    "note": None,
    "metrics": {"loss": [2.3, 1.1, 0.7], "acc": 0.81},
}


def _register_plain(protocol: int) -> None:
    @benign(
        f"pickle-data-p{protocol}",
        f"Python data pickled with protocol {protocol}",
        "dicts, lists, tuples, numbers, strings and None only",
    )
    def build(out: Path, canary: Path) -> Path:
        path = out / f"data_p{protocol}.pkl"
        path.write_bytes(pickle.dumps(_DATA, protocol=protocol))
        return path


for _protocol in range(6):
    _register_plain(_protocol)


@benign(
    "pickle-argparse-namespace",
    "argparse.Namespace of training arguments",
    "imports argparse.Namespace (transformers saves TrainingArguments alike)",
    expect="medium",
)
def argparse_namespace(out: Path, canary: Path) -> Path:
    args = argparse.Namespace(
        lr=1e-4, batch_size=32, epochs=3, seed=1234, output_dir="runs/exp1", fp16=False
    )
    path = out / "training_args.pkl"
    path.write_bytes(pickle.dumps(args, protocol=4))
    return path
