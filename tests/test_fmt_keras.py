"""Keras configs (.keras zips and legacy .h5): what runs code is found, plain models stay quiet.

Malicious and benign files for the corpus live in ``trainguard.samples.fmt_keras``
(``tests/test_corpus.py`` scans them). Here: each reference rule on its own,
the caps, the optional h5py extra, fuzzing, and a watch for imports or
unmarshalling while scanning.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from tests.helpers import call1
from trainguard import Severity, scan_bytes, scan_file
from trainguard.findings import FileResult
from trainguard.limits import Limits
from trainguard.samples import BENIGN, MALICIOUS, Sample
from trainguard.samples.fmt_keras import _dense, _input, _mlp_config, _sequential
from trainguard.scanner.policy import Policy


def _keras(
    config: Any, *, raw: bytes | None = None, extra: dict[str, bytes] | None = None
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        z.writestr("config.json", raw if raw is not None else json.dumps(config))
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _scan(config: Any, **kwargs: Any) -> FileResult:
    limits = kwargs.pop("limits", Limits())
    policy = kwargs.pop("policy", None)
    return scan_bytes(_keras(config, **kwargs), "m.keras", limits=limits, policy=policy)


def _rules(result: FileResult) -> list[str]:
    return [f.rule for f in result.findings]


def _with_activation(activation: object) -> dict[str, Any]:
    dense = _dense("dense", 1, activation, 4)
    return _sequential("s", [_input("input_layer", [None, 4]), dense], [None, 4])


def test_plain_model_is_clean_and_labelled() -> None:
    result = _scan(_mlp_config("s"))
    assert result.findings == [] and result.error is None
    assert result.format.startswith("zip (keras")


@pytest.mark.parametrize(
    ("reference", "rule"),
    [
        # Keras 3 writes these itself.
        ({"module": "keras.optimizers", "class_name": "Adam", "config": {}}, None),
        (
            {
                "module": "keras.src.backend.torch.optimizers.torch_adam",
                "class_name": "Adam",
                "config": {},
            },
            None,
        ),
        ({"module": "keras.src.ops.numpy", "class_name": "Add", "config": {}}, None),
        ({"module": "builtins", "class_name": "function", "config": "relu"}, None),
        ({"module": "builtins", "class_name": "function", "config": "my_pkg>my_fn"}, None),
        ({"module": "keras.activations", "class_name": "function", "config": "gelu"}, None),
        # CVE-2025-1550: any module, builtins, Keras internals and utilities.
        ({"module": "os", "class_name": "function", "config": "system"}, "TG1002"),
        ({"module": "subprocess", "class_name": "Popen", "config": {}}, "TG1002"),
        ({"module": "builtins", "class_name": "function", "config": "exec"}, "TG1002"),
        ({"module": "builtins", "class_name": "eval", "config": {}}, "TG1002"),
        ({"module": "keras.utils", "class_name": "function", "config": "get_file"}, "TG1002"),
        (
            {"module": "keras.src.utils.file_utils", "class_name": "function", "config": "x"},
            "TG1002",
        ),
        ({"module": "keras.src.saving", "class_name": "Loader", "config": {}}, "TG1002"),
        ({"module": "keras.layers", "class_name": "function", "config": "os.system"}, "TG1002"),
        (
            {"module": "x", "class_name": "function", "config": None, "registered_name": "a>b"},
            "TG1002",
        ),
        ({"module": "__main__", "class_name": "MyActivation", "config": {}}, "TG1002"),
        ({"module": "keras_hub.src.models", "class_name": "GemmaBackbone", "config": {}}, "TG1004"),
    ],
)
def test_references(reference: dict[str, object], rule: str | None) -> None:
    result = _scan(_with_activation(reference))
    assert _rules(result) == ([rule] if rule else []), result.findings


def test_denied_reference_names_module_and_advisory() -> None:
    ref = {"module": "os", "class_name": "function", "config": "system", "registered_name": None}
    (finding,) = _scan(_with_activation(ref)).findings
    assert finding.severity == Severity.CRITICAL
    assert finding.member == "config.json"
    assert finding.evidence["module"] == "os"
    assert "CVE-2025-1550" in finding.evidence["advisory"]
    assert finding.trigger == "$.config.layers[1].config.activation"


def test_policy_allows_a_users_own_module_but_not_builtins() -> None:
    policy = Policy(allow_globals=frozenset({"mypkg.layers", "builtins"}))
    own = {"module": "mypkg.layers", "class_name": "Custom", "config": {}}
    assert _scan(_with_activation(own), policy=policy).findings == []
    builtin = {"module": "builtins", "class_name": "function", "config": "exec"}
    assert _rules(_scan(_with_activation(builtin), policy=policy)) == ["TG1002"]


def test_lambda_is_reported_once_with_the_names_its_code_uses() -> None:
    from trainguard.samples.fmt_keras import marshalled_lambda

    code = marshalled_lambda("lambda x: __import__('os').system('true')")
    function = {"class_name": "__lambda__", "config": {"code": code, "defaults": None}}
    lam = {"module": "keras.layers", "class_name": "Lambda", "config": {"function": function}}
    config = _sequential("s", [_input("i", [None, 4]), lam], [None, 4])
    (finding,) = _scan(config).findings
    assert finding.rule == "TG1001"
    assert "system" in finding.evidence["code_names"]


def test_keras2_lambda_source_and_tfsmlayer() -> None:
    legacy = {
        "class_name": "Lambda",
        "config": {"function": ["aW1wb3J0IG9z", None, None], "function_type": "lambda"},
    }
    tfsm = {"module": "keras.layers", "class_name": "TFSMLayer", "config": {"filepath": "/x"}}
    config = _sequential("s", [legacy, tfsm], [None, 4])
    assert sorted(_rules(_scan(config))) == ["TG1001", "TG1003"]


def test_torch_module_wrapper_pickle_is_analysed() -> None:
    pickled = base64.b64encode(call1("os", "system", "true")).decode()
    layer = {
        "module": "keras.layers",
        "class_name": "TorchModuleWrapper",
        "config": {"module": pickled},
    }
    rules = _rules(_scan(_sequential("s", [layer], [None, 4])))
    assert "TG1005" in rules and "TG101" in rules


def test_every_config_json_of_a_zip_is_checked() -> None:
    """Readers disagree about duplicate names: a Lambda in either copy is found."""
    evil = _with_activation({"module": "os", "class_name": "function", "config": "system"})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("metadata.json", "{}")
            z.writestr("config.json", json.dumps(_mlp_config("s")))
            z.writestr("config.json", json.dumps(evil))
    result = scan_bytes(buf.getvalue(), "dup.keras")
    assert "TG1002" in _rules(result) and "TG204" in _rules(result)


def test_a_zip_with_only_config_json_is_still_checked() -> None:
    """Keras runs config.json before it misses the weights: a stripped archive attacks too."""
    evil = _with_activation({"module": "os", "class_name": "function", "config": "system"})
    for config, rules in ((evil, ["TG1002"]), ("not json", [])):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            raw = config if isinstance(config, str) else json.dumps(config)
            z.writestr("config.json", raw)
        assert _rules(scan_bytes(buf.getvalue(), "stripped.keras")) == rules


@pytest.mark.parametrize(
    ("raw", "limits", "rule"),
    [
        (b"{not json", Limits(), "TG003"),
        (b"[" * 200_000, Limits(), "TG003"),
        (json.dumps(_mlp_config("s")).encode(), Limits(max_model_config=100), "TG002"),
        (json.dumps(_mlp_config("s")).encode(), Limits(max_config_nodes=10), "TG002"),
    ],
    ids=["invalid", "deep", "too-big", "too-many-values"],
)
def test_bad_or_huge_configs_are_findings(raw: bytes, limits: Limits, rule: str) -> None:
    result = _scan(None, raw=raw, limits=limits)
    assert result.error is None
    assert rule in _rules(result)


def _json_values() -> st.SearchStrategy[object]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(["keras", "os", "function", "Lambda", "builtins", "exec", "keras.src.x"]),
        st.text(max_size=8),
    )
    keys = st.sampled_from(["module", "class_name", "config", "registered_name", "layers", "x"])
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5),
        max_leaves=40,
    )


@settings(max_examples=fuzz_examples(150), deadline=None)
@given(_json_values())
def test_fuzz_config_walk_never_crashes(config: object) -> None:
    result = _scan(config)
    assert result.error is None, result.error


@settings(max_examples=fuzz_examples(60), deadline=None)
@given(st.data())
def test_fuzz_mutated_keras_zip(data: st.DataObject) -> None:
    blob = bytearray(_keras(_with_activation({"module": "os", "class_name": "system"})))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    result = scan_bytes(bytes(blob), "fuzz.keras")
    assert result.error is None, result.error


# -- legacy HDF5 -------------------------------------------------------------------------


def test_h5_without_h5py_is_not_inspected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    path = MALICIOUS["keras-h5-lambda"].build(tmp_path, tmp_path / "canary")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    result = scan_file(path)
    assert _rules(result) == ["TG208"]
    assert result.verdict == Severity.HIGH


def test_h5_attribute_forms_and_caps(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    import numpy as np

    evil = json.dumps(_with_activation({"module": "os", "class_name": "system"}))
    path = tmp_path / "fixed.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = np.bytes_(evil.encode())  # fixed-length, as older Keras
        h5.attrs["training_config"] = np.arange(3)  # not a string: reported, not fatal
    result = scan_file(path)
    assert sorted(_rules(result)) == ["TG003", "TG1002"], result.findings
    assert result.format == "hdf5 (keras-h5)"
    small = scan_file(path, limits=Limits(max_model_config=64))
    assert "TG002" in _rules(small)


def test_h5_weights_only_and_garbage(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("w", data=[1.0, 2.0])
    assert scan_file(path).findings == []
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    assert _rules(scan_file(broken)) == ["TG003"]


@settings(max_examples=fuzz_examples(40), deadline=None)
@given(data=st.data())
def test_fuzz_mutated_h5(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    """libhdf5 parses the file: damaged ones must give findings, never a crash."""
    pytest.importorskip("h5py")
    folder = tmp_path_factory.mktemp("h5")
    blob = bytearray(MALICIOUS["keras-h5-lambda"].build(folder, folder / "canary").read_bytes())
    for _ in range(data.draw(st.integers(1, 16))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    result = scan_bytes(bytes(blob), "fuzz.h5")
    assert result.error is None, result.error


def test_real_keras_models_are_clean_if_keras_is_installed(tmp_path: Path) -> None:
    """Interop: files written by Keras itself (run where keras is installed)."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    script = textwrap.dedent(
        f"""
        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
        m.compile(optimizer="adam", loss="mse", metrics=["mae"])
        m.save({str(tmp_path / "real.keras")!r})
        m.save({str(tmp_path / "real.h5")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    for name in ("real.keras", "real.h5"):
        assert scan_file(tmp_path / name).findings == []


# -- the scan never imports, compiles or unmarshals what it reads ---------------------------

_WATCHER = textwrap.dedent(
    """
    import sys, trainguard, trainguard.scanner.engine, trainguard.render
    import trainguard.render.text, trainguard.render.jsonfmt, trainguard.render.sarif
    # The scanner imports its own format modules, by fixed names, on first use:
    # load them all first so that any import seen below is one the data caused.
    from trainguard.scanner import registry; registry.preload()
    import h5py, zlib
    events = []
    watching = False
    BAD = ("import", "exec", "compile", "subprocess.Popen", "os.system", "os.exec",
           "os.posix_spawn", "socket.connect", "pickle.find_class", "marshal.loads")
    def isolated_parser(event, args):
        # HDF5 is parsed by trainguard's own fixed program in a limited child
        # (trainguard.scanner.isolated): the one process a scan may start.
        argv = list(args[1]) if event == "subprocess.Popen" else []
        return (argv[:3] == [sys.executable, "-I", "-c"] and "RLIMIT_AS" in argv[3]
                and "h5py.File(path" in argv[3])
    spawned = []
    def hook(event, args):
        if watching and event.startswith(BAD):
            if isolated_parser(event, args):
                spawned.append(args[1][4])
            else:
                events.append((event, repr(args)[:200]))
    sys.addaudithook(hook)
    watching = True
    report = trainguard.scan(sys.argv[1:])
    assert spawned, "no HDF5 file reached the isolated parser"
    watching = False
    assert report.verdict is not None and report.verdict.name == "CRITICAL", report.verdict
    print("EVENTS", events)
    sys.exit(1 if events else 0)
    """
)


def test_scanning_keras_onnx_savedmodel_samples_runs_nothing(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    canary = tmp_path / "canary"
    prefixes = ("keras-", "onnx-", "tf-")
    for table in (MALICIOUS, BENIGN):
        for sample in table.values():
            if sample.id.startswith(prefixes) and "torch" not in sample.requires:
                folder = tmp_path / sample.id
                folder.mkdir()
                sample.build(folder, canary)
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EVENTS []" in proc.stdout
    assert not canary.exists()


# -- every Keras sample, whether or not its loader is installed ------------------------
# (tests/test_corpus.py skips samples whose loader is missing; scanning needs none.)

_SAMPLES = [s for s in (*MALICIOUS.values(), *BENIGN.values()) if s.id.startswith(("keras-",))]


@pytest.mark.parametrize("sample", _SAMPLES, ids=[s.id for s in _SAMPLES])
def test_sample_verdict(sample: Sample, tmp_path: Path) -> None:
    for module in sample.requires:
        pytest.importorskip(module)
    result = scan_file(sample.build(tmp_path, tmp_path / "canary"))
    assert result.error is None, result.error
    summary = [(f.rule, str(f.severity), f.message) for f in result.findings]
    if sample.expect == "clean":
        assert result.verdict is None or result.verdict <= Severity.LOW, summary
    else:
        expected = Severity.parse(sample.expect)
        assert result.verdict is not None and result.verdict >= expected, summary
        assert sample.malicious or result.verdict == expected, summary
    assert not (tmp_path / "canary").exists()
