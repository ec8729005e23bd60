"""Trust policy at load (issue 16 §1): only bytes a trusted signer sealed load.

With a policy naming one key: a checkpoint sealed by it loads (through torch,
pickle, numpy, joblib, trainguard.load and ``trainguard run``); one that is
unsealed, sealed by another key, or altered after sealing is refused with
the reason before any byte is unpickled.  The refused files carry a payload
that touches a canary; the checks run in subprocesses with the *real*
unpickler (``unpickler="real"``), so only the trust check stands between the
payload and the process.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trainguard
from tests.protect_variants import Call
from trainguard.errors import PolicyError
from trainguard.loader.trust import load_trust
from trainguard.signing.keys import write_keypair

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
joblib = pytest.importorskip("joblib")

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = textwrap.dedent(
    """
    import json, os, sys, pickle
    import torch, numpy, joblib, trainguard
    policy, jobs = sys.argv[1], json.loads(sys.argv[2])
    LOAD = {
        "torch": lambda p: torch.load(p, weights_only=False),
        "pickle": lambda p: pickle.load(open(p, "rb")),
        "numpy": lambda p: numpy.load(p, allow_pickle=True),
        "joblib": joblib.load,
        "trainguard.load": lambda p: trainguard.load(p, trust=policy),
        "pickle.loads": lambda p: pickle.loads(open(p, "rb").read()),
    }
    for name, loader, path in jobs:
        pid = os.fork()
        if pid == 0:
            trainguard.protect(trust=policy, unpickler="real")
            try:
                LOAD[loader](path)
                result = ["loaded"]
            except trainguard.UnsafeModelError as exc:
                result = ["refused", sorted({f.rule for f in exc.findings})]
            except BaseException as exc:
                result = ["error", repr(exc)[:300]]
            os.write(1, (json.dumps([name, *result]) + "\\n").encode())
            os._exit(0)
        os.waitpid(pid, 0)
    """
)


def _payload(canary: Path) -> object:
    return {"weights": [1.0, 2.0], "x": Call(pathlib.Path.touch, (canary,))}


@pytest.fixture()
def store(tmp_path: Path) -> dict[str, Path]:
    """A folder sealed by the trusted key, one by another key, one unsealed."""
    trusted, other = write_keypair(tmp_path / "trusted"), write_keypair(tmp_path / "other")
    canary = tmp_path / "canary"
    good, stranger, loose = tmp_path / "good", tmp_path / "stranger", tmp_path / "loose"
    for folder in (good, stranger, loose):
        folder.mkdir()
    torch.save({"w": torch.arange(6.0)}, good / "model.pt")
    with open(good / "data.pkl", "wb") as f:
        pickle.dump({"lr": 0.1}, f)
    np.save(good / "arr.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    joblib.dump({"coef": np.arange(3.0)}, good / "est.joblib")
    torch.save({"w": torch.ones(4)}, good / "altered.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, good / "w.safetensors")
    save_file({"w": torch.ones(2)}, loose / "w.safetensors")
    with open(good / "swapped.pkl", "wb") as f:
        pickle.dump({"lr": 0.2}, f)
    for folder in (stranger, loose):
        torch.save(_payload(canary), folder / "model.pt")
        with open(folder / "data.pkl", "wb") as f:
            pickle.dump(_payload(canary), f)
    trainguard.seal(good, trusted[0])
    trainguard.seal(stranger, other[0])
    kept = tmp_path / "kept"  # sealed, its signature kept elsewhere
    kept.mkdir()
    torch.save({"w": torch.zeros(2)}, kept / "model.pt")
    (tmp_path / "sigs").mkdir()
    trainguard.seal(kept, trusted[0], signature=tmp_path / "sigs" / "kept.sig")
    # After sealing: one byte of a tensor flipped, one file replaced by a payload.
    data = bytearray((good / "altered.pt").read_bytes())
    at = data.index(b"\x00\x00\x80\x3f")  # a 1.0 float in the tensor data
    data[at + 3] ^= 0x01
    (good / "altered.pt").write_bytes(bytes(data))
    with open(good / "swapped.pkl", "wb") as f:
        pickle.dump(_payload(canary), f)
    policy = tmp_path / "trust.toml"
    policy.write_text(
        f'[trust]\nkeys = ["{trusted[1].name}"]\n[trust.signatures]\n"kept" = "sigs/kept.sig"\n'
    )
    folders = {"kept": kept, "good": good, "stranger": stranger, "loose": loose}
    return {**folders, "policy": policy, "canary": canary}


def _run(policy: Path, jobs: list[tuple[str, str, str]]) -> dict[str, list[object]]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(policy), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            name, *result = json.loads(line)
            out[name] = result
    assert len(out) == len(jobs), proc.stderr[-2000:]
    return out


def test_trusted_seal_loads_and_nothing_else_runs(store: dict[str, Path]) -> None:
    good, stranger, loose = store["good"], store["stranger"], store["loose"]
    jobs = [
        ("sealed torch", "torch", str(good / "model.pt")),
        ("sealed pickle", "pickle", str(good / "data.pkl")),
        ("sealed numpy", "numpy", str(good / "arr.npy")),
        ("sealed joblib", "joblib", str(good / "est.joblib")),
        ("sealed trainguard.load", "trainguard.load", str(good / "model.pt")),
        ("sealed safetensors via torch.load", "torch", str(good / "w.safetensors")),
        ("sealed, signature named by the policy", "torch", str(store["kept"] / "model.pt")),
        ("unsealed torch", "torch", str(loose / "model.pt")),
        ("unsealed safetensors", "torch", str(loose / "w.safetensors")),
        ("unsealed pickle", "pickle", str(loose / "data.pkl")),
        ("other key torch", "torch", str(stranger / "model.pt")),
        ("other key pickle", "pickle", str(stranger / "data.pkl")),
        ("one byte altered", "torch", str(good / "altered.pt")),
        ("one byte altered, trainguard.load", "trainguard.load", str(good / "altered.pt")),
        ("replaced after sealing", "pickle", str(good / "swapped.pkl")),
        ("bytes from no file", "pickle.loads", str(good / "data.pkl")),
    ]
    results = _run(store["policy"], jobs)
    assert not store["canary"].exists()
    loaded = {n for n, r in results.items() if r == ["loaded"]}
    assert loaded == {n for n, *_ in jobs if n.startswith("sealed")}, results
    assert results["unsealed torch"] == ["refused", ["TG504"]]
    assert results["unsealed pickle"] == ["refused", ["TG504"]]
    assert results["unsealed safetensors"] == ["refused", ["TG504"]]
    assert results["other key torch"] == ["refused", ["TG501"]]
    assert results["other key pickle"] == ["refused", ["TG501"]]
    assert results["one byte altered"] == ["refused", ["TG503"]]
    assert results["one byte altered, trainguard.load"] == ["refused", ["TG503"]]
    assert results["replaced after sealing"] == ["refused", ["TG503"]]
    assert results["bytes from no file"] == ["refused", ["TG504"]]
    # The refused payloads are real: the plain loader runs them.
    code = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(loose / "data.pkl")], cwd=ROOT, check=True)
    assert store["canary"].exists()


def test_trainguard_run_reads_the_trust_policy_from_the_environment(
    store: dict[str, Path], tmp_path: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text("import sys, torch\ntorch.load(sys.argv[1], weights_only=False)\n")
    runs = {}
    for name in ("good", "loose"):
        runs[name] = subprocess.run(
            [sys.executable, "-m", "trainguard", "run", str(script), str(store[name] / "model.pt")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**_env(), "TRAINGUARD_TRUST": str(store["policy"])},
        )
    assert runs["good"].returncode == 0, runs["good"].stderr[-2000:]
    assert runs["loose"].returncode == 1, runs["loose"].stderr[-2000:]
    assert "TG504" in runs["loose"].stderr
    assert not store["canary"].exists()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_invalid_trust_policies_list_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[trust]\nkeys = ["missing.pub"]\nin_memory = "maybe"\ncolour = 1\n')
    with pytest.raises(PolicyError) as exc:
        load_trust(bad)
    message = str(exc.value)
    assert "missing.pub" in message and "in_memory" in message and "colour" in message
    empty = tmp_path / "empty.toml"
    empty.write_text("[trust]\n")
    with pytest.raises(PolicyError, match="no trusted keys"):
        load_trust(empty)


def test_a_policy_names_keyless_identities_and_seals_kept_elsewhere(tmp_path: Path) -> None:
    write_keypair(tmp_path / "ci")
    policy = tmp_path / "trust.toml"
    policy.write_text(
        "[trust]\n"
        'keys = ["ci.pub"]\n'
        'identities = [{identity = "https://github.com/org/repo/.github/workflows/t.yml@refs/'
        'heads/main", issuer = "https://token.actions.githubusercontent.com"}]\n'
        "[trust.signatures]\n"
        '"runs/run42" = "sigs/run42.sig"\n'
    )
    trust = load_trust(policy)
    assert len(trust.keys) == 1 and trust.in_memory == "refuse"
    assert trust.identities[0].issuer == "https://token.actions.githubusercontent.com"
    assert trust.signatures == ((tmp_path / "runs" / "run42", tmp_path / "sigs" / "run42.sig"),)


def test_a_planted_or_stale_seal_never_outvotes_the_folders_seal(tmp_path: Path) -> None:
    """Red team trust_mixmatch_1/2 with a payload: a single-file seal of the payload,
    copied beside a sealed folder's file with the payload's bytes, and a parent folder
    sealed when the file held the payload, put back after a re-seal.  The real loaders
    in a subprocess refuse both, and the canary is untouched."""
    trusted = write_keypair(tmp_path / "trusted")
    canary = tmp_path / "canary"
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    for folder in (ckpt, other):
        folder.mkdir()
    torch.save({"w": torch.ones(3)}, ckpt / "model.pt")
    torch.save(_payload(canary), other / "probe.pt")
    trainguard.seal(ckpt, trusted[0], name="prod", version="7")
    trainguard.seal(other / "probe.pt", trusted[0])
    (ckpt / "model.pt").write_bytes((other / "probe.pt").read_bytes())
    (ckpt / "model.pt.sig").write_bytes((other / "probe.pt.sig").read_bytes())
    runs = tmp_path / "runs"
    inner = runs / "exp" / "ckpt"
    inner.mkdir(parents=True)
    torch.save(_payload(canary), inner / "model.pt")
    old = (inner / "model.pt").read_bytes()
    trainguard.seal(runs, trusted[0], name="runs", version="1")
    torch.save({"w": torch.ones(3)}, inner / "model.pt")
    trainguard.seal(inner, trusted[0], name="prod", version="2")
    (inner / "model.pt").write_bytes(old)
    policy = tmp_path / "trust.toml"
    policy.write_text(f'[trust]\nkeys = ["{trusted[1].name}"]\n')
    jobs = [
        ("planted torch", "torch", str(ckpt / "model.pt")),
        ("planted trainguard.load", "trainguard.load", str(ckpt / "model.pt")),
        ("rollback torch", "torch", str(inner / "model.pt")),
        ("rollback pickle", "pickle", str(inner / "model.pt")),
        ("payload under its own name and seal", "torch", str(other / "probe.pt")),
    ]
    results = _run(policy, jobs)
    assert not canary.exists(), results
    assert results["planted torch"] == ["refused", ["TG503", "TG506"]]
    assert results["planted trainguard.load"] == ["refused", ["TG503", "TG506"]]
    assert results["rollback torch"] == ["refused", ["TG503"]]
    assert results["rollback pickle"] == ["refused", ["TG503"]]
    # Control: the trusted key did seal the payload under its own name, so the trust
    # check passes there and only the scan behind it refuses (no TG5xx rule): the
    # seals' coverage is what stood in the way above.
    verdict, found = results["payload under its own name and seal"]
    assert verdict == "refused" and found and not [r for r in found if r.startswith("TG5")]


def test_the_policy_holds_the_deciding_seal_to_a_name_version_and_pin(tmp_path: Path) -> None:
    trusted = write_keypair(tmp_path / "trusted")
    release = tmp_path / "release"
    release.mkdir()
    with open(release / "data.pkl", "wb") as f:
        pickle.dump({"lr": 0.1}, f)
    v6 = trainguard.seal(release, trusted[0], name="prod", version="6").manifest_digest
    v7 = trainguard.seal(release, trusted[0], name="prod", version="7").manifest_digest
    head = f'[trust]\nkeys = ["{trusted[1].name}"]\n'

    def rules(settings: str) -> list[str]:
        policy = tmp_path / "trust.toml"
        policy.write_text(head + settings)
        try:
            trainguard.load(release / "data.pkl", trust=policy)
        except trainguard.UnsafeModelError as exc:
            return sorted(f.rule for f in exc.findings)
        return []

    assert rules('expect_name = "prod"\nmin_version = "7"\n') == []
    assert rules('min_version = "8"\n') == ["TG508"]
    assert rules('expect_name = "staging"\n') == ["TG509"]
    assert rules(f'[trust.pins]\n"release" = "{v7}"\n') == []
    assert rules(f'[trust.pins]\n"release" = "{v6}"\n') == ["TG508"]
    # A pin on a root no seal covers: nothing vouches for the pinned manifest.
    assert rules(f'[trust.pins]\n"." = "{v7}"\n') == ["TG508"]
    bad = tmp_path / "bad.toml"
    bad.write_text(head + 'min_version = "seven"\n[trust.pins]\n"release" = "abc"\n')
    with pytest.raises(PolicyError) as exc:
        load_trust(bad)
    assert "seven" in str(exc.value) and "64 hex" in str(exc.value)
