"""A real-world benign corpus: files honest users save, scanned for false alarms.

Two sources, rebuilt on every run (nothing large is committed):

- package data: every model-like file the packages installed in this venv ship
  (scikit-learn, scipy, numpy, joblib, onnx, h5py, torch test data...);
- files written by the libraries themselves: torch.save of state dicts, whole
  modules, optimizers and schedulers, TorchScript archives, a checkpoint from a
  real tiny Lightning run, transformers' save_pretrained and training_args.bin,
  scikit-learn estimators through pickle and joblib (every protocol and
  compressor), numpy object arrays of plain data, hyper-parameters holding
  timezone-aware datetimes, SimpleNamespace, enums, typing.Any, loggers, re
  patterns.

    .venv/bin/python bench/benign_corpus.py [OUT_DIR]

prints how many files got each verdict and lists every high or critical
finding.  The bar: 0 high or critical.  ``tests/test_corpus.py`` runs a small
slice (:func:`build_generated` with ``small=True``).
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

_DATA_SUFFIXES = (
    ".pkl",
    ".pickle",
    ".npy",
    ".npz",
    ".pt",
    ".pth",
    ".joblib",
    ".ckpt",
    ".mat",
    ".bin",
    ".h5",
    ".hdf5",
    ".onnx",
    ".tp",
    ".gz",
    ".bz2",
    ".xz",
    ".lzma",
    ".z",
    ".safetensors",
    ".gguf",
    ".keras",
)


def copy_package_data(out: Path, limit_bytes: int = 64 << 20) -> int:
    """Copy the model-like files installed packages ship; returns how many."""
    site = Path(sysconfig.get_paths()["purelib"])
    n = 0
    for path in sorted(site.rglob("*")):
        name = path.name.lower()
        if not path.is_file() or not name.endswith(_DATA_SUFFIXES):
            continue
        if path.stat().st_size > limit_bytes or "trainguard" in str(path):
            continue
        rel = path.relative_to(site)
        dest = out / "package-data" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        n += 1
    return n


# -- files written by the libraries ---------------------------------------------------


def _torch_files(out: Path, small: bool) -> None:
    import argparse
    import datetime
    import enum
    import logging
    import re
    import types
    import typing
    import zoneinfo

    import torch

    class Mode(enum.Enum):
        TRAIN = "train"

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    hparams = {
        "when": datetime.datetime.now(datetime.timezone.utc),
        "tz": datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        "ns": types.SimpleNamespace(lr=1e-3, layers=[4, 8]),
        "args": argparse.Namespace(seed=1, name="run"),
        "any": typing.Any,
        "optional": typing.Optional[int],  # noqa: UP045 (the pickled shape under test)
        "log": logging.getLogger("train"),
        "pattern": re.compile(r"layer\.(\d+)", re.IGNORECASE),
        "flags": re.IGNORECASE | re.MULTILINE,
        "h": hash,
        "path": Path("runs/1"),
    }
    d = out / "torch"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), d / "state_dict.pt")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, d / "train.ckpt")
    torch.save(hparams, d / "hparams.pt")
    torch.save(torch.nn.Parameter(torch.randn(3)), d / "parameter.pt")
    torch.save({"w": torch.randn(2, 2).to(torch.bfloat16), "i": torch.arange(3)}, d / "dt.pt")
    torch.save(net, d / "whole_module.pt")
    torch.jit.save(torch.jit.script(net), d / "scripted.pt")
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 4)), d / "traced.pt")
    if small:
        return
    torch.save(opt, d / "optimizer_object.pt")
    torch.save(sched.state_dict(), d / "scheduler.pt")
    torch.save({"mode": Mode.TRAIN.value, "rng": torch.get_rng_state()}, d / "rng.pt")
    torch.save(net.state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    for proto in (2, 3, 4, 5):
        torch.save(hparams, d / f"hparams_p{proto}.pt", pickle_protocol=proto)
    sparse = torch.randn(4, 4).to_sparse()
    torch.save(
        {"sparse": sparse, "q": torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)},
        d / "sparse_quant.pt",
    )


def _sklearn_files(out: Path, small: bool) -> None:
    import pickle

    import joblib
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 2, size=40)
    models = {
        "logreg": LogisticRegression().fit(x, y),
        "pipeline": make_pipeline(StandardScaler(), PCA(2), LogisticRegression()).fit(x, y),
    }
    if not small:
        models["forest"] = RandomForestClassifier(n_estimators=3).fit(x, y)
        models["kmeans"] = KMeans(2, n_init=1).fit(x)
    d = out / "sklearn"
    d.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        for proto in (0, 2, 5) if small else range(6):
            (d / f"{name}_p{proto}.pkl").write_bytes(pickle.dumps(model, protocol=proto))
        for comp in ("zlib", "gzip") if small else ("zlib", "gzip", "bz2", "lzma", "xz"):
            joblib.dump(model, d / f"{name}.{comp}.joblib", compress=(comp, 3))
        joblib.dump(model, d / f"{name}.joblib")
    np.save(d / "objects.npy", np.array([{"a": 1}, [1, 2], "x"], dtype=object))
    np.savez(d / "arrays.npz", a=np.arange(4), b=np.array(["x", None], dtype=object))
    (d / "rng.pkl").write_bytes(pickle.dumps(np.random.RandomState(0)))
    (d / "generator.pkl").write_bytes(pickle.dumps(np.random.default_rng(1)))


def _scipy_files(out: Path, small: bool) -> None:
    import pickle

    import scipy.sparse

    d = out / "scipy"
    d.mkdir(parents=True, exist_ok=True)
    m = scipy.sparse.random(5, 5, density=0.3, format="csr", random_state=0)
    (d / "csr.pkl").write_bytes(pickle.dumps(m))
    scipy.sparse.save_npz(d / "csr.npz", m)


def _lightning_files(out: Path, small: bool) -> None:
    import logging

    import pytorch_lightning as pl
    import torch

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 1e-2, name: str = "tiny", dims: tuple[int, ...] = (4, 2)):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(*dims)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    d = out / "lightning"
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=str(d),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(d / "tiny.ckpt")


def _transformers_files(out: Path, small: bool) -> None:
    import torch
    from transformers import BertConfig, BertModel, TrainingArguments

    d = out / "transformers"
    d.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
    )
    model = BertModel(cfg)
    model.save_pretrained(d / "bert", safe_serialization=False)
    model.save_pretrained(d / "bert-st")
    args = TrainingArguments(output_dir=str(d / "run"), report_to=[])
    torch.save(args, d / "training_args.bin")


GENERATORS: dict[str, Callable[[Path, bool], None]] = {
    "torch": _torch_files,
    "sklearn": _sklearn_files,
    "scipy": _scipy_files,
    "lightning": _lightning_files,
    "transformers": _transformers_files,
}


def build_generated(out: Path, *, small: bool = False, only: tuple[str, ...] = ()) -> list[str]:
    """Write the library-made files; returns the generators skipped (module missing)."""
    skipped = []
    for name, gen in GENERATORS.items():
        if only and name not in only:
            continue
        try:
            gen(out, small)
        except ImportError as exc:
            skipped.append(f"{name}: {exc}")
    return skipped


def main(argv: list[str]) -> int:
    from trainguard import Severity, scan

    out = Path(argv[0] if argv else "/tmp/trainguard-benign")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    copied = copy_package_data(out)
    skipped = build_generated(out)
    t0 = time.perf_counter()
    report = scan([out])
    took = time.perf_counter() - t0
    verdicts = Counter(str(f.verdict) if f.verdict else "clean" for f in report.files)
    print(f"{len(report.files)} files ({copied} package data), scanned in {took:.1f} s")
    print("verdicts:", dict(sorted(verdicts.items())))
    for line in skipped:
        print("skipped", line)
    bad = 0
    for f in report.files:
        if f.error:
            print("ERROR", f.path, f.error)
            bad += 1
        for x in f.findings:
            if x.severity >= Severity.HIGH:
                print(f"{x.severity}", x.rule, f.path, x.member, x.trigger, "|", x.message[:120])
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
