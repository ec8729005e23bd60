"""protect() in real flows: a Hugging Face style resume, the CLI runner, convert."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import py_touch

torch = pytest.importorskip("torch")

# The resume steps of transformers' Trainer (_load_optimizer_and_scheduler,
# _load_rng_state), written out so the test needs no transformers install.
_RESUME = textwrap.dedent(
    """
    import os, random, sys
    import numpy as np, torch
    import trainguard
    trainguard.protect()
    ckpt = sys.argv[1]
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    model.load_state_dict(torch.load(os.path.join(ckpt, "pytorch_model.bin"), map_location="cpu"))
    opt.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu"))
    sched.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=False))
    rng = torch.load(os.path.join(ckpt, "rng_state.pth"), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.random.set_rng_state(rng["cpu"])
    args = torch.load(os.path.join(ckpt, "training_args.bin"), weights_only=False)
    print("RESUMED", args.lr)
    # After loading, the sandbox is out of the way of ordinary training code.
    open(os.path.join(ckpt, "after.txt"), "w").write("ok")
    import subprocess
    subprocess.run(["true"], check=True)
    """
)


def _checkpoint(folder: Path) -> Path:
    import argparse
    import random

    import numpy as np

    folder.mkdir()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    torch.save(rng, folder / "rng_state.pth")
    torch.save(argparse.Namespace(lr=0.25), folder / "training_args.bin")
    return folder


def _resume(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RESUME, str(folder)], capture_output=True, text=True, timeout=120
    )


def test_clean_resume_works_under_protect(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "checkpoint-500")
    proc = _resume(folder)
    assert proc.returncode == 0, proc.stderr
    assert "RESUMED 0.25" in proc.stdout
    assert (folder / "after.txt").read_text() == "ok"


def test_poisoned_rng_state_is_refused(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "checkpoint-500")
    canary = tmp_path / "canary"
    # The incident's likely path: a shared checkpoint's rng_state.pth carries code.
    payload = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary)).stop()
    (folder / "rng_state.pth").write_bytes(payload.getvalue())
    proc = _resume(folder)
    assert proc.returncode != 0
    assert "UnsafeModelError" in proc.stderr and "TG101" in proc.stderr
    assert "RESUMED" not in proc.stdout
    assert not canary.exists()


def test_trainguard_run_protects_a_script(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(
        PickleAsm(2).proto(2).call("os", "system", f"touch {canary}").stop().getvalue()
    )
    script = tmp_path / "job.py"
    script.write_text("import pickle, sys\npickle.load(open(sys.argv[1], 'rb'))\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainguard", "run", str(script), str(evil)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "refused to load" in proc.stderr
    assert not canary.exists()


def test_environment_variable_turns_protect_on(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(
        PickleAsm(2).proto(2).call("os", "system", f"touch {canary}").stop().getvalue()
    )
    code = "import trainguard, pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(evil)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRAINGUARD_PROTECT": "block"},
    )
    assert proc.returncode != 0 and "UnsafeModelError" in proc.stderr
    assert not canary.exists()


def test_unprotect_restores_the_originals() -> None:
    import pickle

    import trainguard

    before = (pickle.load, pickle.loads, torch.load)
    trainguard.protect()
    try:
        assert pickle.loads is not before[1]
        assert pickle.loads(pickle.dumps({"a": 1})) == {"a": 1}
    finally:
        trainguard.unprotect()
    assert (pickle.load, pickle.loads, torch.load) == before


def test_convert_writes_safetensors_and_json(tmp_path: Path) -> None:
    import trainguard
    from trainguard.loader.convert import convert

    ckpt = {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
        "epoch": 7,
        "step": torch.tensor(3.0),  # 0-dim, as Adam saves its step
        "lr": 0.5,
    }
    torch.save(ckpt, tmp_path / "ck.pt")
    st, js = convert(tmp_path / "ck.pt", tmp_path / "new" / "folder" / "out")
    assert st.parent == tmp_path / "new" / "folder"  # created, as users expect
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    w = header["model.w"]
    assert w["dtype"] == "F32" and w["shape"] == [2, 3]
    start, end = w["data_offsets"]
    data = raw[8 + n + start : 8 + n + end]
    assert torch.equal(
        torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(2, 3), ckpt["model"]["w"]
    )
    structure = json.loads(js.read_text())["structure"]
    assert structure["epoch"] == 7 and structure["model"]["b"] == {"__tensor__": "model.b"}
    assert trainguard.load(tmp_path / "ck.pt")["lr"] == 0.5


def test_convert_refuses_a_malicious_checkpoint(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(
        PickleAsm(2).proto(2).call("os", "system", f"touch {canary}").stop().getvalue()
    )
    proc = subprocess.run(
        [sys.executable, "-m", "trainguard", "convert", str(evil), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "TG101" in proc.stderr
    assert not canary.exists() and not (tmp_path / "out.safetensors").exists()


def test_protect_checks_the_environment_against_a_sealed_snapshot(tmp_path: Path) -> None:
    import trainguard
    from tests.test_env_support import NAME, fresh_site
    from trainguard.cli.main import main
    from trainguard.signing.keys import generate_keypair

    private, public = generate_keypair("ecdsa-p256")
    (tmp_path / "k.pem").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    site = fresh_site(tmp_path)
    snap = tmp_path / "env.json"
    args = ["env", "snapshot", "--path", str(site), "--key", str(tmp_path / "k.pem")]
    assert main([*args, "-o", str(snap), "--no-cache", "--no-progress"]) == 0
    env = {"env_snapshot": snap, "env_key": str(tmp_path / "k.pub"), "env_paths": [str(site)]}
    trainguard.protect(**env)
    trainguard.unprotect()
    module = next(p for p in site.rglob("*.py") if NAME in str(p.parent))
    module.write_text(module.read_text() + "\nimport os  # planted\n")
    with pytest.raises(trainguard.UnsafeModelError) as err:
        trainguard.protect(**env)
    assert not trainguard.is_protected()
    assert {"TG601", "TG615"} & {f.rule for f in err.value.findings}
