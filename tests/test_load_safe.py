"""trainguard.loader: benign checkpoints load bit for bit; anything unsafe is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard import UnsafeModelError, load
from trainguard.samples import BENIGN, MALICIOUS, missing_modules

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.requires_grad == b.requires_grad
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def training_checkpoint() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "shared": [torch.arange(10.0)[2:5], torch.arange(10.0)],
        "empty": torch.zeros(0, 3),
    }


def test_training_checkpoint_matches_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(training_checkpoint(), path)
    ours = load(path)
    theirs = torch.load(path, weights_only=False)
    assert same(ours, theirs)


def test_views_share_storage_as_in_torch(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    path = tmp_path / "views.pt"
    torch.save({"a": base, "b": base[3:7]}, path)
    out = load(path)
    out["a"][4] = -1.0
    assert out["b"][1] == -1.0  # one storage, as torch.load gives


def test_numpy_and_plain_pickles(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", x=arr, y=arr[:1])
    import pickle

    (tmp_path / "c.pkl").write_bytes(pickle.dumps({"lr": 0.1, "w": arr, "s": {1, 2}}, 4))
    assert same(load(tmp_path / "a.npy"), arr)
    assert same(load(tmp_path / "b.npz"), {"x": arr, "y": arr[:1]})
    assert same(load(tmp_path / "c.pkl"), {"lr": 0.1, "w": arr, "s": {1, 2}})


def test_user_class_needs_policy(tmp_path: Path) -> None:
    import argparse
    import pickle

    from trainguard import Policy

    (tmp_path / "args.pkl").write_bytes(pickle.dumps(argparse.Namespace(lr=0.1)))
    with pytest.raises(UnsafeModelError) as err:
        load(tmp_path / "args.pkl")
    assert err.value.findings[0].rule == "TG401"
    allowed = load(tmp_path / "args.pkl", policy=Policy(frozenset({"argparse.Namespace"})))
    assert allowed.lr == 0.1


def test_tensor_reaching_outside_its_storage_is_refused(tmp_path: Path) -> None:
    # A hand-edited geometry (CVE-2026-24747 style): size 100 over a storage of 4.
    from trainguard.samples.assembler import PickleAsm
    from trainguard.samples.zipwriter import torch_members, zip_bytes

    a = PickleAsm(2).proto(2).global_("torch._utils", "_rebuild_tensor_v2").mark()
    a.mark().str_("storage").global_("torch", "FloatStorage").str_("0").str_("cpu").push(4)
    a.tuple_().binpersid().push(0).push((100,)).push((1,)).push(False)
    a.global_("collections", "OrderedDict").empty_tuple().reduce().tuple_().reduce().stop()
    path = tmp_path / "oob.pt"
    path.write_bytes(zip_bytes(torch_members(a.getvalue(), {"0": bytes(16)})))
    with pytest.raises(UnsafeModelError) as err:
        load(path)
    assert err.value.findings[0].rule == "TG402"


_PROBE = """
import json, sys
from pathlib import Path
import trainguard
out = {}
for path in sys.argv[1:]:
    try:
        trainguard.load(path)
        out[path] = "loaded"
    except trainguard.UnsafeModelError as exc:
        out[path] = "refused:" + ",".join(sorted({f.rule for f in exc.findings}))
    except trainguard.TrainguardError as exc:
        out[path] = "error:" + type(exc).__name__
print(json.dumps(out))
"""


def test_every_malicious_sample_is_refused_or_unsupported(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    paths = {}
    for sid, sample in MALICIOUS.items():
        if missing_modules(sample):
            continue
        folder = tmp_path / sid
        folder.mkdir()
        paths[str(sample.build(folder, canary))] = sid
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    loaded = [paths[p] for p, r in results.items() if r == "loaded"]
    assert loaded == [], loaded
    assert not canary.exists()
    assert sum(r.startswith("refused") for r in results.values()) >= len(results) // 2


@pytest.mark.parametrize(
    "sid", [s for s, v in BENIGN.items() if v.loader in ("torch", "pickle") and v.expect == "clean"]
)
def test_benign_samples_load(sid: str, tmp_path: Path) -> None:
    sample = BENIGN[sid]
    if missing_modules(sample):
        pytest.skip("optional module missing")
    path = sample.build(tmp_path, tmp_path / "canary")
    if sid.endswith("legacy"):
        pytest.skip("the legacy torch format is not supported by trainguard.load")
    load(path)
