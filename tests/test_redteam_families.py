"""Families a fresh-context red team got past ``scan`` and ``protect()`` (issue 11).

Each family is generated (several members, a fresh seed each run, printed; set
``TRAINGUARD_MUTATION_SEED`` to replay) and a slice is proven to fire under its
real loader in a subprocess (``tests.test_samples_fire._run_all``); the scanner
must flag every member.  Nothing here loads a hostile file in this process.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_mutations import _seed
from tests.test_samples_fire import _run_all
from trainguard import Severity, scan_file
from trainguard.samples.zipwriter import ZipMember, write_zip


@pytest.fixture(scope="module")
def seed() -> int:
    return _seed()


# --- jitcode: TorchScript code judged by tokens, not by a regex over its text ---


def test_every_spelling_of_a_file_operator_is_critical(seed: int, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from trainguard.samples.mal_jitcode import SPELLINGS, WHERE, draw_jit, jit_mutant

    for where in WHERE:
        for spelling in SPELLINGS:
            sample = jit_mutant(spelling, where)
            folder = tmp_path / sample.id
            folder.mkdir()
            result = scan_file(sample.build(folder, folder / "canary"))
            assert result.verdict is Severity.CRITICAL, (sample.id, result.findings)
    rng = random.Random(seed)
    fire = {s.id: s for s in (draw_jit(rng) for _ in range(3))}
    (tmp_path / "run" / "canaries").mkdir(parents=True)
    outcomes = _run_all(tmp_path / "run", list(fire.values()))
    silent = {k: o.log[-400:] for k, o in outcomes.items() if not o.fired}
    assert not silent, f"TRAINGUARD_MUTATION_SEED={seed}: {silent}"


_HEAD = """class M(Module):
  __parameters__ = []
  training : bool
  def forward(self: __torch__.M,
    x: Tensor) -> Tensor:
"""


def _archive(path: Path, body: str) -> Path:
    members = [
        ZipMember("m/data.pkl", b"\x80\x02}q\x00."),
        ZipMember("m/code/__torch__.py", (_HEAD + body).encode()),
        ZipMember("m/constants.pkl", b"\x80\x02)."),
        ZipMember("m/version", b"3\n"),
    ]
    return write_zip(path, members)


@pytest.mark.parametrize(
    ("body", "worst"),
    [
        # An alias of a namespace, then the operator through it.
        ("    a = ops.aten\n    return a.from_file('/tmp/x', True, 1)\n", Severity.CRITICAL),
        # The overload spelled out.
        ("    return ops.aten.save.default(x, '/tmp/x')\n", Severity.CRITICAL),
        ("    return ops .  aten  # c\n", Severity.HIGH),
        ("    return getattr(torch, 'from_file')('/tmp/x')\n", Severity.HIGH),
        ("    return torch.classes.mylib.Shell().run(x)\n", Severity.HIGH),
        ("    return x\n  'unterminated\n", Severity.HIGH),
        ("    return torch.add(x, ops.prim.min(x))\n", None),
    ],
)
def test_tokens_decide(body: str, worst: Severity | None, tmp_path: Path) -> None:
    result = scan_file(_archive(tmp_path / "m.pt", body))
    found = [f.severity for f in result.findings if f.rule == "TG113"]
    assert (max(found) if found else None) is worst, result.findings


def test_torchscript_state_is_judged_by_its_code_not_called(tmp_path: Path) -> None:
    # An honest module with custom __getstate__/__setstate__ (the red team's F5).
    torch = pytest.importorskip("torch")

    class S(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.n = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, int, bool]:
            return (self.w, self.n, self.training)

        @torch.jit.export
        def __setstate__(self, st: tuple[torch.Tensor, int, bool]) -> None:
            self.w = st[0]
            self.n = st[1]
            self.training = st[2]

    torch.jit.save(torch.jit.script(S()), tmp_path / "s.pt")
    result = scan_file(tmp_path / "s.pt")
    assert result.verdict is not None and result.verdict <= Severity.MEDIUM, result.findings


# --- pkgcode: torch.package archives ship modules that run when imported ---


def test_package_modules_are_judged_and_fire(seed: int, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from trainguard.samples.mal_pkgcode import PAYLOADS, draw_pkg, pkg_mutant

    for payload in PAYLOADS:
        sample = pkg_mutant(payload)
        folder = tmp_path / sample.id
        folder.mkdir()
        result = scan_file(sample.build(folder, folder / "canary"))
        assert result.verdict is Severity.CRITICAL, (sample.id, result.findings)
    rng = random.Random(seed ^ 0x9C)
    fire = {s.id: s for s in (draw_pkg(rng) for _ in range(2))}
    (tmp_path / "run" / "canaries").mkdir(parents=True)
    outcomes = _run_all(tmp_path / "run", list(fire.values()))
    silent = {k: o.log[-400:] for k, o in outcomes.items() if not o.fired}
    assert not silent, f"TRAINGUARD_MUTATION_SEED={seed}: {silent}"


def test_an_archive_that_ships_code_is_high_and_protect_refuses_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from torch.package.package_exporter import PackageExporter

    from trainguard.samples.mal_pkgcode import pkg_mutant

    honest = tmp_path / "net.pt"
    with PackageExporter(str(honest)) as pe:
        pe.extern("torch.**")
        pe.save_source_string("mynet", "import torch\nclass Net(torch.nn.Module):\n    pass\n")
        pe.save_pickle("pkg", "cfg.pkl", {"a": 1})
    result = scan_file(honest)
    assert [f.severity for f in result.findings if f.rule == "TG114"] == [Severity.HIGH]
    # protect() refuses the archive before PackageImporter imports anything.
    hostile = pkg_mutant("pathlib").build(tmp_path, tmp_path / "canary")
    code = (
        "import sys, trainguard; trainguard.protect()\n"
        "import torch.package\n"
        "torch.package.PackageImporter(sys.argv[1]).load_pickle('pkg', 'obj.pkl')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hostile)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "TG114" in proc.stderr, proc.stderr[-600:]
    assert not (tmp_path / "canary").exists()


# --- gadget + modswap: container and BUILD opcodes on objects the pickle did not build ---


def test_container_and_build_opcodes_on_foreign_objects(seed: int, tmp_path: Path) -> None:
    from trainguard.samples import missing_modules
    from trainguard.samples.mal_mutate import (
        GADGET_MAKE,
        GADGET_OPS,
        LAUNDER,
        STATES,
        SWAPS,
        draw_mutate,
        gadget,
        modswap,
    )

    members = [gadget(m, o) for m in GADGET_MAKE for o in GADGET_OPS]
    members += [modswap(la, st, i) for la in LAUNDER for st in STATES for i in range(len(SWAPS))]
    for sample in members:
        folder = tmp_path / sample.id
        folder.mkdir()
        result = scan_file(sample.build(folder, folder / "canary"))
        floor = Severity.CRITICAL if sample.expect == "critical" else Severity.HIGH
        assert result.verdict is not None and result.verdict >= floor, (sample.id, result.findings)
    rng = random.Random(seed ^ 0x6A)
    fire = {s.id: s for s in (draw_mutate(rng) for _ in range(4)) if not missing_modules(s)}
    (tmp_path / "run" / "canaries").mkdir(parents=True)
    outcomes = _run_all(tmp_path / "run", list(fire.values()))
    silent = {k: o.log[-400:] for k, o in outcomes.items() if not o.fired}
    assert not silent, f"TRAINGUARD_MUTATION_SEED={seed}: {silent}"


def test_protect_refuses_container_calls_on_foreign_classes(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    from trainguard.samples.mal_mutate import gadget

    hostile = gadget("newobj", "setitem").build(tmp_path, tmp_path / "canary")
    # The restricted unpickler itself refuses (TG401), with scanning and the sandbox
    # out of the way: an in-memory effect would get past both.
    code = (
        "import pickle, sys\n"
        "from trainguard.loader.restricted import unpickler_for\n"
        "cls = unpickler_for(frozenset(), 'x')\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    cls(f).load()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hostile)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "__setitem__" in proc.stderr, proc.stderr[-600:]
    assert not (tmp_path / "canary").exists()


# --- callthrough + nested: callees behind helpers, pickles behind a class's state ---


def test_helper_callees_and_unpickling_state(seed: int, tmp_path: Path) -> None:
    from trainguard.samples import missing_modules
    from trainguard.samples.mal_callthrough import (
        ENCODINGS,
        HELPERS,
        LAUNDER,
        SHAPES,
        callthrough,
        draw_callthrough,
        nested,
    )

    members = [callthrough(h, la) for h in HELPERS for la in LAUNDER]
    members += [nested(e, s) for e in ENCODINGS for s in SHAPES]
    for sample in members:
        folder = tmp_path / sample.id
        folder.mkdir()
        result = scan_file(sample.build(folder, folder / "canary"))
        assert result.verdict is not None and result.verdict >= Severity.HIGH, (
            sample.id,
            result.findings,
        )
    rng = random.Random(seed ^ 0xC7)
    fire = {s.id: s for s in (draw_callthrough(rng) for _ in range(4)) if not missing_modules(s)}
    (tmp_path / "run" / "canaries").mkdir(parents=True)
    outcomes = _run_all(tmp_path / "run", list(fire.values()))
    silent = {k: o.log[-400:] for k, o in outcomes.items() if not o.fired}
    assert not silent, f"TRAINGUARD_MUTATION_SEED={seed}: {silent}"


def test_bytes_built_from_constants_are_probed_for_pickles(tmp_path: Path) -> None:
    from trainguard.samples.mal_callthrough import nested

    # bytes([...]) of the inner os.system pickle: its payload is named, not only the wrapper.
    path = nested("bytes", "dict_keys").build(tmp_path, tmp_path / "canary")
    result = scan_file(path)
    assert any(f.rule == "TG110" for f in result.findings), result.findings
    assert result.verdict is Severity.CRITICAL


# --- false alarms: honest non-dense tensors load under protect() as under torch.load ---

_NON_DENSE = """
import sys, torch
d = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
honest = {
    "coo": d.to_sparse(),
    "csr": d.to_sparse_csr(),
    "csc": d.to_sparse_csc(),
    "q": torch.quantize_per_tensor(d, 0.1, 3, torch.quint8),
    "qc": torch.quantize_per_channel(d, torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), 0,
                                     torch.qint8),
    "nested": torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)]),
}
path = sys.argv[1]
torch.save(honest, path)
plain = torch.load(path, weights_only=False)
import trainguard
trainguard.protect()
guarded = torch.load(path, weights_only=False)
for key, value in plain.items():
    got = guarded[key]
    if key == "nested":
        same = all(torch.equal(a, b) for a, b in zip(value.unbind(), got.unbind()))
    elif key.startswith("q"):
        same = torch.equal(value.int_repr(), got.int_repr()) and value.qscheme() == got.qscheme()
    else:
        same = torch.equal(value.to_dense(), got.to_dense()) and value.layout == got.layout
    assert same, key
print("SAME", sorted(plain))
"""


def test_non_dense_tensors_load_under_protect_as_under_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-c", _NON_DENSE, str(tmp_path / "t.pt")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-1500:]


_SKLEARN = """
import sys, joblib, numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
x = np.random.default_rng(0).normal(size=(60, 3))
y = (x[:, 0] > 0).astype(int)
models = {"rf": RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y),
          "hgb": HistGradientBoostingClassifier(max_iter=3).fit(x, y)}
for name, model in models.items():
    joblib.dump(model, f"{sys.argv[1]}/{name}.joblib")
plain = {n: joblib.load(f"{sys.argv[1]}/{n}.joblib").predict_proba(x) for n in models}
import trainguard
trainguard.protect()
for name in models:
    got = joblib.load(f"{sys.argv[1]}/{name}.joblib").predict_proba(x)
    assert np.array_equal(got, plain[name]), name
print("SAME")
"""


def test_sklearn_trees_and_boosting_load_under_protect(tmp_path: Path) -> None:
    # The red team's F1: Cython types the scanner knows are safe to call, refused by protect().
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, "-c", _SKLEARN, str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-1500:]


_GENERATOR = """
import sys, torch
g = torch.Generator()
g.manual_seed(7)
torch.rand(3, generator=g)
torch.save({"sampler_generator": g, "epoch": 2}, sys.argv[1])
plain = torch.load(sys.argv[1], weights_only=False)["sampler_generator"]
import trainguard
trainguard.protect()
got = torch.load(sys.argv[1], weights_only=False)["sampler_generator"]
assert torch.equal(plain.get_state(), got.get_state())
assert plain.initial_seed() == got.initial_seed()
print("SAME")
"""


def test_a_checkpoint_with_a_generator_scans_clean_and_loads_under_protect(tmp_path: Path) -> None:
    # The red team's F3: restoring a random generator's state is data.
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _GENERATOR, str(path)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-1500:]
    result = scan_file(path)
    assert result.verdict is None or result.verdict < Severity.HIGH, result.findings


def test_a_generator_called_with_anything_else_stays_critical(tmp_path: Path) -> None:
    from trainguard.samples.mal_callthrough import _g, _u

    path = tmp_path / "g.pkl"
    path.write_bytes(b"\x80\x02" + _g("torch._C", "Generator") + b"(" + _u("/etc/x") + b"K\x01tR.")
    assert scan_file(path).verdict is Severity.CRITICAL


_UFUNC = """
import sys, joblib, numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
x = np.abs(np.random.default_rng(1).normal(size=(40, 2)))
y = (x[:, 0] > x[:, 1]).astype(int)
pipe = make_pipeline(FunctionTransformer(np.log1p), StandardScaler(), LogisticRegression())
joblib.dump(pipe.fit(x, y), sys.argv[1])
plain = joblib.load(sys.argv[1]).predict_proba(x)
import trainguard
trainguard.protect()
assert np.array_equal(joblib.load(sys.argv[1]).predict_proba(x), plain)
# Referenced, never called: a pickle that calls a ufunc while loading is refused.
from trainguard.loader.restricted import unpickler_for
import io
try:
    unpickler_for(frozenset(), "x")(io.BytesIO(b"cnumpy\\nlog1p\\n(K\\x01tR.")).load()
except trainguard.UnsafeModelError as exc:
    print("SAME; call refused:", exc)
"""


def test_numpy_ufuncs_load_as_values_never_as_calls(tmp_path: Path) -> None:
    # The red team's F2: FunctionTransformer(np.log1p) refused by protect().
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, "-c", _UFUNC, str(tmp_path / "p.joblib")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "SAME; call refused" in proc.stdout, proc.stderr[-1500:]
    called = tmp_path / "c.pkl"
    called.write_bytes(b"cnumpy\nlog1p\n(K\x01tR.")
    verdict = scan_file(called).verdict
    assert verdict is not None and verdict >= Severity.HIGH


def test_restricted_unpickler_refuses_state_a_class_would_unpickle(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from trainguard.samples.mal_callthrough import nested

    hostile = nested("raw", "dict_keys").build(tmp_path, tmp_path / "canary")
    # The unpickler alone (no sandbox): the datapipe wrapper's BUILD is refused.
    code = (
        "import sys, torch.utils.data.datapipes.datapipe\n"
        "from trainguard.loader.restricted import unpickler_for\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    unpickler_for(frozenset(), 'x')(f).load()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(hostile)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "unpickles the state" in proc.stderr, proc.stderr[-600:]
    assert not (tmp_path / "canary").exists()


_DEQUE = """
import collections, sys, torch
honest = {"ema": collections.deque([0.5, 0.25], maxlen=4), "cfg": collections.OrderedDict(a=1)}
torch.save(honest, sys.argv[1])
import trainguard
trainguard.protect()
assert torch.load(sys.argv[1], weights_only=False) == honest
print("SAME")
"""


def test_builtin_containers_still_fill_under_protect(tmp_path: Path) -> None:
    # Container opcodes on a deque or OrderedDict call their builtin methods: data.
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-c", _DEQUE, str(tmp_path / "d.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-1500:]


_PKG_SANDBOX = """
import sys, trainguard
from trainguard.findings import Severity
from trainguard.scanner.policy import Policy
trainguard.protect(Policy(severity={"TG114": Severity.LOW}))
import torch.package
importer = torch.package.PackageImporter(sys.argv[1])  # judged, let through by the policy
try:
    importer.load_pickle("pkg", "obj.pkl")
except trainguard.UnsafeModelError as exc:
    print("REFUSED", str(exc)[:200])
"""


def test_package_modules_import_inside_the_sandbox(tmp_path: Path) -> None:
    # Even when a policy lets the archive through, its modules run later, at
    # load_pickle/import_module: the sandbox is on then.
    pytest.importorskip("torch")
    from trainguard.samples.mal_pkgcode import pkg_mutant

    hostile = pkg_mutant("pathlib").build(tmp_path, tmp_path / "canary")
    proc = subprocess.run(
        [sys.executable, "-c", _PKG_SANDBOX, str(hostile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "REFUSED" in proc.stdout and "TG403" in proc.stdout, proc.stdout + proc.stderr[-800:]
    assert not (tmp_path / "canary").exists()
