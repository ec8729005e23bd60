"""ONNX: external-data paths, custom domains, nested graphs, sniffing and fuzzing.

The corpus samples (``trainguard.samples.fmt_onnx``) are scanned by
``tests/test_corpus.py``; the onnx package, when installed, proves the
hand-written protobuf is what ONNX itself reads and writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard import Severity, scan_bytes, scan_file
from trainguard.limits import Limits
from trainguard.samples import BENIGN, MALICIOUS, Sample
from trainguard.samples.fmt_onnx import (
    _add_relu,
    graph,
    graph_attribute,
    model,
    node,
    tensor,
    value_info,
)
from trainguard.scanner.base import Blob
from trainguard.scanner.formats.onnx import OnnxFormat, external_location_problem


@pytest.mark.parametrize(
    ("location", "unsafe"),
    [
        ("weights.bin", False),
        ("sub/dir/weights.bin", False),
        ("./a/../weights.bin", False),
        ("", True),
        ("/etc/passwd", True),
        ("\\\\server\\share\\w.bin", True),
        ("C:\\Windows\\win.ini", True),
        ("c:w.bin", True),
        ("~/.ssh/id_rsa", True),
        ("../weights.bin", True),
        ("a/../../weights.bin", True),
        ("a\\..\\..\\weights.bin", True),
        ("..", True),
        ("w.bin\x00.txt", True),
    ],
)
def test_external_location_problem(location: str, unsafe: bool) -> None:
    assert bool(external_location_problem(location)) is unsafe


def _rules(data: bytes, **kwargs: object) -> list[str]:
    result = scan_bytes(data, "m.onnx", **kwargs)  # type: ignore[arg-type]
    assert result.error is None, result.error
    return [f.rule for f in result.findings]


def _nested_if(depth: int, leaf: bytes) -> bytes:
    """An If whose then_branch holds an If ... ``depth`` levels down to ``leaf``."""
    g = leaf
    for level in range(depth):
        g = graph(
            f"level{level}",
            [node("If", ["C"], ["Y"], attributes=(graph_attribute("then_branch", g),))],
            inputs=[],
            outputs=[value_info("Y")],
        )
    return g


def test_traversal_deep_in_subgraphs_is_found() -> None:
    leaf = graph(
        "leaf",
        [node("Identity", ["K"], ["Y"])],
        inputs=[],
        outputs=[value_info("Y")],
        initializers=[tensor("K", [1.0], location="../../secret")],
    )
    data = model(_nested_if(5, leaf))
    result = scan_bytes(data, "m.onnx")
    (finding,) = result.findings
    assert finding.rule == "TG1111" and finding.severity == Severity.CRITICAL
    assert finding.trigger == "../../secret"
    assert "then_branch" in finding.message


def test_subgraph_depth_is_capped() -> None:
    leaf = graph("leaf", [node("Relu", ["X"], ["Y"])], inputs=[], outputs=[value_info("Y")])
    data = model(_nested_if(6, leaf))
    assert _rules(data, limits=Limits(max_graph_depth=3)) == ["TG002"]
    assert _rules(data) == []


def test_custom_domains_are_grouped_and_local_functions_are_not_custom() -> None:
    nodes = [node(f"Op{i}", ["X"], [f"Y{i}"], domain="com.example") for i in range(8)]
    nodes.append(node("Other", ["X"], ["Z"], domain="org.other"))
    data = model(graph("g", nodes, inputs=[value_info("X")], outputs=[value_info("Z")]))
    result = scan_bytes(data, "m.onnx")
    assert [(f.rule, f.trigger) for f in result.findings] == [
        ("TG1112", "com.example"),
        ("TG1112", "org.other"),
    ]
    assert "(+3 more)" in result.findings[0].message
    benign = BENIGN["onnx-if-subgraphs-and-function"]
    assert benign.expect == "clean"


def test_standard_and_runtime_domains_are_quiet() -> None:
    nodes = [
        node("Add", ["X", "X"], ["A"], domain="ai.onnx"),
        node("FusedMatMul", ["A", "A"], ["B"], domain="com.microsoft"),
        node("LabelEncoder", ["B"], ["Y"], domain="ai.onnx.ml"),
    ]
    data = model(graph("g", nodes, inputs=[value_info("X")], outputs=[value_info("Y")]))
    assert _rules(data) == []


def test_sniff_is_specific() -> None:
    fmt = OnnxFormat()
    plain = model(_add_relu(tensor("B", [1.0, 2.0])))

    def sniff(data: bytes) -> bool:
        return fmt.sniff(data[:4096], Blob("", lambda: None, len(data)))  # type: ignore[arg-type,return-value]

    assert sniff(plain)
    from trainguard.samples.fmt_savedmodel import saved_model

    assert not sniff(saved_model())
    assert not sniff(b"\x80\x04\x95" + b"\x00" * 40)  # a pickle
    assert not sniff(b"\x08\x01")  # ir_version alone is not a model
    assert not sniff(b"")
    # Fields reordered (graph first) are still ONNX to protobuf parsers, and to us.
    reordered = plain[plain.index(b"\x3a") :] + plain[: plain.index(b"\x3a")]
    assert sniff(reordered)


def test_truncated_and_damaged_models_never_read_as_clean() -> None:
    data = model(_add_relu(tensor("B", [1.0], location="/etc/passwd")))
    for cut in range(1, len(data)):
        result = scan_bytes(data[:cut], "cut.onnx")
        assert result.error is None
        # Either not taken for ONNX at all, or a finding: never a silent pass as ONNX.
        assert result.format != "onnx" or result.findings, cut


@settings(max_examples=fuzz_examples(150), deadline=None)
@given(st.data())
def test_fuzz_mutated_models(data: st.DataObject) -> None:
    blob = bytearray(model(_add_relu(tensor("B", [1.0, 2.0], location="w.bin"))))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    result = scan_bytes(bytes(blob), "fuzz.onnx")
    assert result.error is None, result.error


# -- the real onnx package ---------------------------------------------------------------


def test_samples_are_what_onnx_reads(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    for sample_id in ("onnx-add-relu", "onnx-if-subgraphs-and-function", "onnx-custom-operator"):
        path = BENIGN[sample_id].build(tmp_path, tmp_path / "canary")
        onnx.checker.check_model(onnx.load(path), full_check=False)
    traversal = MALICIOUS["onnx-external-data-traversal"].build(tmp_path, tmp_path / "canary")
    loaded = onnx.load(traversal, load_external_data=False)
    (entry,) = [e for e in loaded.graph.initializer[0].external_data if e.key == "location"]
    assert entry.value.startswith("..")


def test_models_written_by_onnx_are_clean(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    m = helper.make_model(g, producer_name="test")
    onnx.save_model(m, tmp_path / "inline.onnx")
    onnx.save_model(
        m,
        tmp_path / "external.onnx",
        save_as_external_data=True,
        location="external.data",
        size_threshold=0,
    )
    for name in ("inline.onnx", "external.onnx"):
        result = scan_file(tmp_path / name)
        assert result.format == "onnx" and result.findings == [], (name, result.findings)
    m.graph.node.append(helper.make_node("Custom", ["Y"], ["Z"], domain="my.ops"))
    onnx.save_model(m, tmp_path / "custom.onnx")
    assert [f.rule for f in scan_file(tmp_path / "custom.onnx").findings] == ["TG1112"]


# -- every ONNX sample, whether or not its loader is installed ------------------------
# (tests/test_corpus.py skips samples whose loader is missing; scanning needs none.)

_SAMPLES = [s for s in (*MALICIOUS.values(), *BENIGN.values()) if s.id.startswith(("onnx-",))]


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
