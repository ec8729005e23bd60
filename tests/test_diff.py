"""trainguard diff: exact comparison of checkpoints, and what honest training cannot produce.

Checkpoints are real: a small MLP trained with AdamW (or SGD) for a few steps
between saves, then tampered the way an insider would (one weight nudged by an
ulp, a frozen layer edited, the update flipped, the step counter reset).
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.errors import UnsafeModelError
from trainguard.explain.diff.checks import moment_bound
from trainguard.explain.diff.core import diff
from trainguard.explain.diff.sources import open_checkpoint
from trainguard.findings import Severity
from trainguard.loader.convert import convert, write_safetensors
from trainguard.render import render

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")


class Run:
    """An MLP and its optimizer; ``save`` writes a training checkpoint."""

    def __init__(self, opt: str = "adamw", freeze_first: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        if freeze_first:
            self.model[0].requires_grad_(False)
        params = self.model.parameters()
        if opt == "adamw":
            self.opt: Any = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        else:
            self.opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        self.x, self.y = torch.randn(256, 16), torch.randn(256, 4)
        self.steps = 0

    def train(self, n: int) -> Run:
        for _ in range(n):
            idx = torch.randint(0, 256, (32,))
            self.opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self.opt.step()
            self.steps += 1
        return self

    def checkpoint(self) -> dict[str, Any]:
        import copy

        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "step": self.steps,
        }


def save(ckpt: dict[str, Any], path: Path) -> Path:
    torch.save(ckpt, path)
    return path


def rules(report: Any, at_least: Severity = Severity.MEDIUM) -> set[str]:
    return {f.rule for f in report.findings if f.severity >= at_least}


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints at steps 3, 4 (one step later) and 9 (five more)."""
    d = tmp_path_factory.mktemp("honest")
    run = Run().train(3)
    out = {"s3": save(run.checkpoint(), d / "s3.pt")}
    out["s4"] = save(run.train(1).checkpoint(), d / "s4.pt")
    out["s9"] = save(run.train(5).checkpoint(), d / "s9.pt")
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "diff", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- honest runs ------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [("s3", "s4"), ("s4", "s9"), ("s3", "s9")])
def test_honest_consecutive_checkpoints_differ_without_findings(
    honest: dict[str, Path], pair: tuple[str, str]
) -> None:
    report = diff(honest[pair[0]], honest[pair[1]])
    assert not report.identical and report.exit_code() == 1
    assert rules(report) == set(), [f.message for f in report.findings]
    weight = next(t for t in report.tensors if t.path == "model.0.weight")
    assert weight.status == "changed" and weight.fraction > 0.99
    assert weight.max_abs and weight.cosine and weight.cosine > 0.9
    assert {v.path for v in report.values if v.status == "changed"} == {"step"}


def test_reversed_pair_is_read_as_older_newer(honest: dict[str, Path]) -> None:
    report = diff(honest["s4"], honest["s3"])
    assert rules(report) == set()
    assert any("B read as older" in n for n in report.notes)


def test_identical_exits_0(honest: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.pt"
    copy.write_bytes(honest["s4"].read_bytes())
    report = diff(honest["s4"], copy)
    assert report.identical and report.exit_code() == 0 and not report.findings
    done = cli(str(honest["s4"]), str(copy))
    assert done.returncode == 0, done.stderr
    assert "identical" in done.stdout


def test_torch_zip_is_streamed_from_the_file(honest: dict[str, Path]) -> None:
    with open_checkpoint(honest["s3"]) as src:
        assert src.streamed and src.format == "pytorch zip"
        arr = src.read("model.0.weight")
        assert isinstance(arr, np.memmap)  # a view of the file, not a copy
        want = torch.load(honest["s3"], weights_only=True)["model"]["0.weight"]
        assert np.array_equal(arr.reshape(32, 16), want.numpy())


# -- tampering --------------------------------------------------------------------------


def test_one_ulp_edit_is_found_and_concentrated(honest: dict[str, Path], tmp_path: Path) -> None:
    ckpt = torch.load(honest["s4"], weights_only=True)
    w = ckpt["model"]["2.weight"]
    w[1, 7] = float(np.nextafter(np.float32(w[1, 7]), np.float32(np.inf)))
    edited = save(ckpt, tmp_path / "edited.pt")
    report = diff(honest["s4"], edited)
    changed = [t for t in report.tensors if t.status != "same"]
    assert [t.path for t in changed] == ["model.2.weight"]
    assert changed[0].changed == 1 and changed[0].indices == [1 * 32 + 7]
    assert "TG1504" in rules(report, Severity.HIGH)
    done = cli(str(honest["s4"]), str(edited))
    assert done.returncode == 1 and "TG1504" in done.stdout


def test_one_edit_beside_an_honest_step_is_concentrated(tmp_path: Path) -> None:
    run = Run(seed=1).train(2)
    a = save(run.checkpoint(), tmp_path / "a.pt")
    ckpt = run.train(1).checkpoint()
    # A tensor the step did not touch (a buffer-like extra) gets one element edited.
    table = torch.zeros(64, 8)
    ckpt_a = torch.load(a, weights_only=True)
    ckpt_a["model"]["table"] = table.clone()
    a = save(ckpt_a, a)
    table[5, 3] = 1e-3
    ckpt["model"]["table"] = table
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    found = [f for f in report.findings if f.rule == "TG1504"]
    assert [f.member for f in found] == ["model.table"]


def test_frozen_layer_changed(tmp_path: Path) -> None:
    run = Run(freeze_first=True).train(3)
    a = save(run.checkpoint(), tmp_path / "a.pt")
    ckpt = run.train(1).checkpoint()
    ckpt["model"]["0.weight"] += 1e-3 * torch.randn(32, 16)
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    frozen = [f for f in report.findings if f.rule == "TG1501"]
    assert {f.member for f in frozen} == {"model.0.weight"}
    assert frozen[0].severity == Severity.HIGH
    # The honest pair of the same run raises nothing.
    honest_b = save(run.checkpoint(), tmp_path / "honest.pt")
    assert rules(diff(a, honest_b)) == set()


def test_parameter_saved_frozen_changed(tmp_path: Path) -> None:
    lin = torch.nn.Linear(8, 8)
    lin.weight.requires_grad_(False)
    a = save({"params": dict(lin.named_parameters())}, tmp_path / "a.pt")
    with torch.no_grad():
        lin.weight.add_(0.01)
    report = diff(a, save({"params": dict(lin.named_parameters())}, tmp_path / "b.pt"))
    assert {f.member for f in report.findings if f.rule == "TG1501"} == {"params.weight"}


@pytest.mark.parametrize("steps", [1, 5])
def test_update_against_adam_direction(tmp_path: Path, steps: int) -> None:
    run = Run(seed=2).train(3)
    ckpt_a = run.checkpoint()
    a = save(ckpt_a, tmp_path / "a.pt")
    ckpt = run.train(steps).checkpoint()
    for name in ("0.weight", "2.weight"):  # flipped update: w_a - (w_b - w_a)
        ckpt["model"][name] = 2 * ckpt_a["model"][name] - ckpt["model"][name]
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    flagged = {f.member for f in report.findings if f.rule == "TG1503"}
    assert flagged == {"model.0.weight", "model.2.weight"}, report.findings


def test_update_scaled_tenfold(tmp_path: Path) -> None:
    run = Run(seed=3).train(3)
    ckpt_a = run.checkpoint()
    a = save(ckpt_a, tmp_path / "a.pt")
    ckpt = run.train(1).checkpoint()
    w_a, w_b = ckpt_a["model"]["0.weight"], ckpt["model"]["0.weight"]
    ckpt["model"]["0.weight"] = w_a + 10 * (w_b - w_a)
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    assert {f.member for f in report.findings if f.rule == "TG1503"} == {"model.0.weight"}


def test_sgd_momentum_flip(tmp_path: Path) -> None:
    run = Run(opt="sgd", seed=4).train(3)
    ckpt_a = run.checkpoint()
    a = save(ckpt_a, tmp_path / "a.pt")
    ckpt = run.train(1).checkpoint()
    assert rules(diff(a, save(ckpt, tmp_path / "honest.pt"))) == set()
    ckpt["model"]["0.weight"] = 2 * ckpt_a["model"]["0.weight"] - ckpt["model"]["0.weight"]
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    assert {f.member for f in report.findings if f.rule == "TG1503"} == {"model.0.weight"}


def test_step_counter_reset(tmp_path: Path) -> None:
    run = Run(seed=5).train(4)
    a = save(run.checkpoint(), tmp_path / "a.pt")
    ckpt = run.train(1).checkpoint()
    for state in ckpt["optimizer"]["state"].values():
        state["step"] = torch.tensor(1.0)
    report = diff(a, save(ckpt, tmp_path / "b.pt"))
    assert "TG1502" in rules(report, Severity.HIGH)


def test_moment_bound_is_tight_after_one_step() -> None:
    # m = 0.1 g, v = 0.001 g^2: m^2 / v = 10 exactly, the bound for t = 1.
    assert moment_bound(0.9, 0.999, 1) == pytest.approx(10.0)
    assert moment_bound(0.9, 0.999, 0) == 0.0
    assert moment_bound(0.9, 0.999, 2) > moment_bound(0.9, 0.999, 1)


def test_changed_without_an_optimizer_step(honest: dict[str, Path], tmp_path: Path) -> None:
    ckpt = torch.load(honest["s4"], weights_only=True)
    ckpt["model"]["0.weight"] += 1e-4 * torch.randn(32, 16)
    report = diff(honest["s4"], save(ckpt, tmp_path / "b.pt"))
    assert {f.member for f in report.findings if f.rule == "TG1503"} == {"model.0.weight"}


# -- structure --------------------------------------------------------------------------


def test_added_removed_reshaped_retyped(tmp_path: Path) -> None:
    a = save(
        {"w": torch.ones(3, 4), "gone": torch.zeros(2), "r": torch.ones(6), "t": torch.ones(4)},
        tmp_path / "a.pt",
    )
    b = save(
        {
            "w": torch.ones(3, 4),
            "new": torch.zeros(2),
            "r": torch.ones(2, 3),
            "t": torch.ones(4, dtype=torch.float64) * 2,
            "epoch": 3,
        },
        tmp_path / "b.pt",
    )
    report = diff(a, b)
    status = {t.path: t.status for t in report.tensors}
    assert status == {
        "w": "same",
        "gone": "removed",
        "r": "reshaped",
        "t": "retyped",
        "new": "added",
    }
    retyped = next(t for t in report.tensors if t.path == "t")
    assert retyped.changed == 4 and retyped.max_abs == 1.0
    assert [(v.path, v.status) for v in report.values] == [("epoch", "added")]
    assert report.exit_code() == 1


def test_nested_values_compared(tmp_path: Path) -> None:
    a = save({"cfg": {"lr": 0.1, "layers": [1, 2]}, "w": torch.ones(2)}, tmp_path / "a.pt")
    b = save({"cfg": {"lr": 0.2, "layers": [1, 2, 3]}, "w": torch.ones(2)}, tmp_path / "b.pt")
    changes = {(v.path, v.status, v.a, v.b) for v in diff(a, b).values if v.status != "same"}
    assert changes == {("cfg.lr", "changed", "0.1", "0.2"), ("cfg.layers.2", "added", None, "3")}


def test_non_contiguous_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    a = save({"t": base.t(), "row": base[1]}, tmp_path / "a.pt")
    with open_checkpoint(a) as src:
        assert np.array_equal(src.read("t").reshape(6, 4), base.t().numpy())
        assert np.array_equal(src.read("row"), base[1].numpy())


# -- safetensors --------------------------------------------------------------------------


def _st(path: Path, tensors: dict[str, Any]) -> Path:
    packed = {}
    for name, t in tensors.items():
        code = {"float32": "F32", "bfloat16": "BF16", "int64": "I64"}[str(t.dtype)[6:]]
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        packed[name] = (code, list(t.shape), raw)
    write_safetensors(path, packed)
    return path


def test_safetensors_vs_safetensors(tmp_path: Path) -> None:
    w = torch.randn(8, 8)
    bf = torch.randn(16).to(torch.bfloat16)
    a = _st(tmp_path / "a.safetensors", {"w": w, "bf": bf, "n": torch.arange(3)})
    w2, bf2 = w.clone(), bf.clone()
    w2[2, 2] += 0.5
    bf2[3] = -bf2[3]
    b = _st(tmp_path / "b.safetensors", {"w": w2, "bf": bf2, "n": torch.arange(3)})
    report = diff(a, b)
    by = {t.path: t for t in report.tensors}
    assert report.a.format == "safetensors" and report.a.streamed
    assert by["n"].status == "same"
    assert by["w"].changed == 1 and by["w"].max_abs == pytest.approx(0.5)
    assert by["bf"].changed == 1 and by["bf"].max_abs == pytest.approx(2 * abs(float(bf[3])))


def test_converted_checkpoints_keep_optimizer_checks(tmp_path: Path) -> None:
    run = Run(seed=6).train(3)
    ckpt_a = run.checkpoint()
    ckpt_b = run.train(1).checkpoint()
    flipped = dict(ckpt_b, model=dict(ckpt_b["model"]))
    flipped["model"]["0.weight"] = 2 * ckpt_a["model"]["0.weight"] - ckpt_b["model"]["0.weight"]
    paths = {}
    for ckpt in (ckpt_a, ckpt_b):
        # convert cannot write 0-d tensors yet; step counters as numbers, as older torch saved
        for state in ckpt["optimizer"]["state"].values():
            state["step"] = float(state["step"])
    for name, ckpt in (("a", ckpt_a), ("b", ckpt_b), ("flipped", flipped)):
        st, _ = convert(save(ckpt, tmp_path / f"{name}.pt"), tmp_path / name)
        paths[name] = st
    honest = diff(paths["a"], paths["b"], sidecar=True)
    assert honest.a.format == "safetensors + JSON sidecar"
    assert any("taken from the sidecar" in n for n in honest.notes)
    assert rules(honest) == set(), honest.findings
    bad = diff(paths["a"], paths["flipped"], sidecar=True)
    assert {f.member for f in bad.findings if f.rule == "TG1503"} == {"model.0.weight"}


# -- exactness: what loads differently never reads as identical ------------------------


def _pair(tmp_path: Path, a: object, b: object) -> tuple[Path, Path]:
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(b, pb)
    return pa, pb


def _changed(report: object) -> list[tuple[str, str]]:
    values = [(v.path, v.status) for v in report.values if v.status != "same"]  # type: ignore[attr-defined]
    tensors = [(t.path, t.status) for t in report.tensors if t.status != "same"]  # type: ignore[attr-defined]
    return values + tensors


def test_a_long_string_changed_after_its_first_2000_characters_differs(tmp_path: Path) -> None:
    text = "x" * 5000
    report = diff(*_pair(tmp_path, {"note": text}, {"note": text[:-1] + "y"}))
    assert _changed(report) == [("note", "changed")] and report.exit_code() == 1


def test_an_added_key_holding_an_empty_list_differs(tmp_path: Path) -> None:
    w = torch.ones(3)
    report = diff(*_pair(tmp_path, {"w": w}, {"w": w, "hooks": []}))
    assert _changed(report) == [("hooks", "added")]


def test_an_int_key_is_not_a_str_key(tmp_path: Path) -> None:
    w = torch.ones(3)
    report = diff(*_pair(tmp_path, {"state": {0: w}}, {"state": {"0": w}}))
    assert sorted(_changed(report)) == [
        ("state", "changed"),
        ("state.0", "added"),
        ("state.0", "removed"),
    ]
    (value,) = [v for v in report.values if v.path == "state"]
    assert "int" in str(value.a) and "str" in str(value.b)


def test_a_list_saved_as_a_tuple_differs(tmp_path: Path) -> None:
    report = diff(*_pair(tmp_path, {"betas": [0.9, 0.999]}, {"betas": (0.9, 0.999)}))
    assert _changed(report) == [("betas", "changed")]


def test_a_planted_sidecar_is_not_read_unless_asked(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(4), "b": torch.zeros(4)})
    b = _st(tmp_path / "b.safetensors", {"w": torch.zeros(4), "b": torch.ones(4)})
    # A sidecar beside B that swaps the names back: with it, B would read as A.
    structure = {"w": {"__tensor__": "b"}, "b": {"__tensor__": "w"}}
    (tmp_path / "b.json").write_text(json.dumps({"tensors": b.name, "structure": structure}))
    plain = diff(a, b)
    assert sorted(_changed(plain)) == [("b", "changed"), ("w", "changed")]
    assert any("b.json (a JSON sidecar) was not read" in n for n in plain.notes)
    asked = diff(a, b, sidecar=True)
    assert _changed(asked) == []  # what the user asked for, and the report says so
    assert any("taken from the sidecar" in n for n in asked.notes)


def test_malformed_safetensors_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    good = _st(tmp_path / "good.safetensors", {"w": torch.ones(4)})
    with pytest.raises(UnsafeModelError, match="TG801"):
        diff(good, bad)


# -- refusal, outputs ---------------------------------------------------------------------


def test_malicious_checkpoint_is_refused_never_loaded(
    honest: dict[str, Path], tmp_path: Path
) -> None:
    from trainguard.samples.mal_torch import torch_zip

    canary = tmp_path / "CANARY"
    evil = torch_zip(tmp_path, canary)
    done = cli(str(honest["s3"]), str(evil))  # a subprocess, in case anything ran it
    assert done.returncode == 1
    assert "refused to load" in done.stderr and "TG101" in done.stderr
    assert not canary.exists()


def test_json_and_html(honest: dict[str, Path], tmp_path: Path) -> None:
    report = diff(honest["s3"], honest["s4"])
    doc = json.loads(render(report, "json", tool_version="t"))
    assert doc["kind"] == "diff" and doc["identical"] is False and doc["exit_code"] == 1
    assert {t["path"] for t in doc["tensors"]} >= {"model.0.weight", "optimizer.state.0.exp_avg"}
    out = tmp_path / "diff.html"
    done = cli(str(honest["s3"]), str(honest["s4"]), "--format", "html", "-o", str(out))
    assert done.returncode == 1, done.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "model.0.weight" in page
    for needle in ("<script", "http://", "https://", " src=", "<link"):
        assert needle not in page


def test_names_from_the_file_are_escaped(tmp_path: Path) -> None:
    evil = "w\x1b[2J<b>x</b>"
    a = save({evil: torch.ones(2)}, tmp_path / "a.pt")
    b = save({evil: torch.zeros(2)}, tmp_path / "b.pt")
    report = diff(a, b)
    text = render(report, "text", tool_version="t")
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert "<b>x</b>" not in render(report, "html", tool_version="t")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = cli(str(tmp_path / "missing.pt"), str(tmp_path / "missing2.pt"))
    assert done.returncode == 2 and "no such file" in done.stderr


def _mutations(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any], str]:
    """An honest nested checkpoint and one that loads differently, with what was done."""

    def leaf() -> Any:
        return rng.choice([rng.random(), rng.randrange(10**6), "s" * rng.randrange(1, 3000), None])

    base: dict[str, Any] = {"model": {"w": torch.ones(2)}, "opt": {"state": {0: {"step": 3.0}}}}
    for i in range(rng.randrange(1, 5)):
        base[f"k{i}"] = rng.choice([leaf(), [leaf(), leaf()], {"x": leaf()}, (leaf(),)])
    other = copy.deepcopy(base)
    kind = rng.choice(["value", "key-type", "container", "empty", "long-tail"])
    if kind == "value":
        other["k0"] = ("changed", other["k0"])
    elif kind == "key-type":
        other["opt"]["state"] = {"0": other["opt"]["state"][0]}
    elif kind == "container":
        other["opt"] = dict(other["opt"], state=list(other["opt"]["state"].values()))
    elif kind == "empty":
        other[rng.choice(["hooks", "model"])] = rng.choice([[], {}, ()])
    else:
        base["note"], other["note"] = "n" * 2500 + "a", "n" * 2500 + "b"
    return base, other, kind


def test_generated_changes_never_read_as_identical(tmp_path: Path) -> None:
    seed = int(os.environ.get("TRAINGUARD_DIFF_SEED", random.randrange(2**32)))
    print(f"TRAINGUARD_DIFF_SEED={seed}")
    rng = random.Random(seed)
    for i in range(12):
        a, b, kind = _mutations(rng)
        folder = tmp_path / str(i)
        folder.mkdir()
        same = diff(*_pair(folder, a, copy.deepcopy(a)))
        assert _changed(same) == [], (seed, i, kind)
        report = diff(*_pair(folder, a, b))
        assert _changed(report), (seed, i, kind)


def test_dotted_names_that_collide_are_paired_by_their_real_keys(tmp_path: Path) -> None:
    good, bad = torch.ones(4), torch.full((4,), -666.0)
    a = {"a.b": good, "a": {"b": bad}}
    b = {"a": {"b": good}, "a.b": bad}  # same dotted names, in the same order
    report = diff(*_pair(tmp_path, a, b))
    assert report.exit_code() == 1
    assert {t.status for t in report.tensors} == {"changed"}


def test_tensors_in_a_deque_are_compared_and_in_a_set_refused(tmp_path: Path) -> None:
    from collections import deque

    report = diff(*_pair(tmp_path, {"q": deque([torch.ones(2)])}, {"q": deque([torch.zeros(2)])}))
    assert _changed(report) == [("q.0", "changed")]
    same = {"tags": frozenset({"a", "b"})}
    assert _changed(diff(*_pair(tmp_path, same, {"tags": frozenset({"b", "a"})}))) == []
    assert _changed(diff(*_pair(tmp_path, same, {"tags": frozenset({"a", "c"})}))) == [
        ("tags", "changed")
    ]


def test_many_colliding_names_cost_linear_time(tmp_path: Path) -> None:
    # 20,000 entries all flattening to "x.y": pairing stays linear (a quadratic rename
    # took 36 s for 63 KB).
    many = {"x": [{"y": i} for i in range(20_000)]}
    pa, pb = _pair(tmp_path, many, many)
    assert _changed(diff(pa, pb)) == []
