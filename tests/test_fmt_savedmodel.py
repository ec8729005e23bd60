"""TensorFlow SavedModel and keras_metadata.pb, parsed without TensorFlow.

Corpus samples (``trainguard.samples.fmt_savedmodel``) are scanned by
``tests/test_corpus.py``; here each operation class, the standard checkpoint
functions that must stay quiet, evasions by field order, caps and fuzzing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard import Severity, scan_bytes, scan_file
from trainguard.findings import FileResult
from trainguard.limits import Limits
from trainguard.samples import BENIGN, MALICIOUS, Sample
from trainguard.samples.fmt_savedmodel import (
    _graph_nodes,
    attr,
    attr_string,
    attr_strings,
    function,
    node,
    saved_model,
)
from trainguard.samples.protowriter import field, message


def _scan(data: bytes, **kwargs: object) -> FileResult:
    result = scan_bytes(data, "saved_model.pb", **kwargs)  # type: ignore[arg-type]
    assert result.error is None, result.error
    return result


def _rules(data: bytes, **kwargs: object) -> list[str]:
    return [f.rule for f in _scan(data, **kwargs).findings]


def test_plain_model_with_checkpoint_functions_is_clean() -> None:
    result = _scan(saved_model())
    assert result.format == "savedmodel" and result.findings == []


@pytest.mark.parametrize(
    ("op", "attrs", "rule"),
    [
        ("EagerPyFunc", (), "TG1101"),
        ("PyFuncStateless", (), "TG1101"),
        ("WriteFile", (), "TG1102"),
        ("DatasetToTFRecord", (), "TG1102"),
        ("CreateSummaryFileWriter", (), "TG1102"),
        ("PrintV2", (attr("output_stream", attr_string("file:///tmp/x")),), "TG1102"),
        ("PrintV2", (attr("output_stream", attr_string("stderr")),), None),
        ("ReadFile", (), "TG1103"),
        ("MatchingFiles", (), "TG1103"),
        ("ImmutableConst", (attr("memory_region_name", attr_string("/etc/passwd")),), "TG1103"),
        ("RestoreV2", (), "TG1103"),
        ("RpcClient", (), "TG1104"),
        ("DataServiceDatasetV4", (), "TG1104"),
        ("DebugIdentityV2", (attr("debug_urls", attr_strings(["file:///tmp/d"])),), "TG1104"),
        ("DebugIdentity", (), None),
        ("MatMul", (), None),
    ],
)
def test_operations(op: str, attrs: tuple[bytes, ...], rule: str | None) -> None:
    serve = function("__inference_serving_default_1", [node("n", op, ["x"], *attrs)])
    assert _rules(saved_model([serve])) == ([rule] if rule else [])


def test_checkpoint_ops_under_the_tf1_saver_scope_are_quiet() -> None:
    saver = message(
        field(1, "save/Const:0"),
        field(2, "save/control_dependency:0"),
        field(3, "save/restore_all"),
    )
    nodes = [
        *_graph_nodes(),
        node("save/SaveV2", "SaveV2", ["x"]),
        node("save/RestoreV2", "RestoreV2", ["x"]),
        node("other/SaveV2", "SaveV2", ["x"]),
    ]
    graph = message(*(field(1, n) for n in nodes))
    data = message(
        field(1, 1),
        field(2, message(field(1, field(4, "serve")), field(2, graph), field(3, saver))),
    )
    result = _scan(data)
    assert [(f.rule, f.trigger) for f in result.findings] == [("TG1102", "SaveV2")]
    assert "other/SaveV2" in result.findings[0].message


def test_many_nodes_make_one_finding() -> None:
    nodes = [node(f"read{i}", "ReadFile", ["x"]) for i in range(12)]
    (finding,) = _scan(saved_model(extra_nodes=nodes)).findings
    assert "12 node(s)" in finding.message and "(+7 more)" in finding.evidence["nodes"]


def test_graph_split_across_repeated_fields_is_merged() -> None:
    """Protobuf merges repeats of a singular message field; an evasion would hide there."""
    first = field(2, message(field(1, _graph_nodes()[0])))
    second = field(2, message(field(1, node("w", "WriteFile", ["x"]))))
    data = message(field(1, 1), field(2, message(field(1, field(4, "serve")), first, second)))
    assert _rules(data) == ["TG1102"]


def test_keras_json_in_the_object_graph_is_checked() -> None:
    layer = {"class_name": "Lambda", "config": {"function": ["aW1wb3J0IG9z", None, None]}}
    user_object = message(field(1, "_tf_keras_layer"), field(3, json.dumps(layer)))
    objects = message(field(1, field(4, user_object)))
    meta = message(
        field(1, field(4, "serve")), field(2, field(1, _graph_nodes()[0])), field(7, objects)
    )
    assert _rules(message(field(1, 1), field(2, meta))) == ["TG1001"]


def test_keras_metadata_sniff_and_checks() -> None:
    ok = {"class_name": "Dense", "config": {"units": 1}}
    evil = {
        "class_name": "Dense",
        "config": {"activation": {"module": "os", "class_name": "system"}},
    }
    data = message(
        field(
            1,
            message(
                field(2, 1),
                field(3, "root.layer-0"),
                field(4, "_tf_keras_layer"),
                field(5, json.dumps(ok)),
            ),
        ),
        field(
            1,
            message(
                field(2, 2),
                field(3, "root.layer-1"),
                field(4, "_tf_keras_layer"),
                field(5, json.dumps(evil)),
            ),
        ),
    )
    result = _scan(data)
    assert result.format == "keras-metadata"
    (finding,) = result.findings
    assert finding.rule == "TG1002" and finding.trigger.startswith("root.layer-1")


def test_caps_are_findings() -> None:
    data = saved_model(extra_nodes=[node(f"n{i}", "Identity", ["x"]) for i in range(50)])
    assert "TG002" in _rules(data, limits=Limits(max_proto_fields=100))


def test_sniff_rejects_other_protobufs_and_binaries() -> None:
    from trainguard.samples.fmt_onnx import _add_relu, model, tensor

    assert _scan(model(_add_relu(tensor("B", [1.0])))).format == "onnx"
    assert _scan(b"\x08\x02" + saved_model()[2:]).format != "savedmodel"  # schema version 2
    assert _scan(field(1, 1)).format == "unknown"


def test_benign_sample_is_registered_clean() -> None:
    assert BENIGN["tf-savedmodel-matmul"].expect == "clean"


@settings(max_examples=fuzz_examples(150), deadline=None)
@given(st.data())
def test_fuzz_mutated_saved_models(data: st.DataObject) -> None:
    serve = function("__inference_serving_default_1", [node("w", "WriteFile", ["x"])])
    blob = bytearray(saved_model([serve]))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    result = scan_bytes(bytes(blob), "fuzz.pb")
    assert result.error is None, result.error


def test_parses_with_tensorflows_own_schema() -> None:
    """Interop, where TensorFlow is installed: our bytes are TensorFlow's SavedModel."""
    saved_model_pb2 = pytest.importorskip("tensorflow.core.protobuf.saved_model_pb2")
    parsed = saved_model_pb2.SavedModel.FromString(saved_model())
    ops = {n.op for n in parsed.meta_graphs[0].graph_def.node}
    assert {"Placeholder", "MatMul"} <= ops
    functions = {f.signature.name for f in parsed.meta_graphs[0].graph_def.library.function}
    assert "__inference__traced_save_42" in functions


# -- every SavedModel sample, whether or not its loader is installed ------------------------
# (tests/test_corpus.py skips samples whose loader is missing; scanning needs none.)

_SAMPLES = [s for s in (*MALICIOUS.values(), *BENIGN.values()) if s.id.startswith(("tf-",))]


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
