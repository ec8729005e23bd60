"""ONNX samples, written field by field from onnx.proto (no onnx package needed).

Every model computes something small and real (Add, Relu, If, Loop), so the
benign ones load with ``onnx.load`` and pass ``onnx.checker``; the malicious
ones differ by one tensor's external-data location or one operator's domain.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from trainguard.samples.base import benign, malicious
from trainguard.samples.loaders import LOADER_REQUIRES, LOADERS
from trainguard.samples.protowriter import field, message, packed, string_map

# onnx.load reads every tensor's external data (load_external_data=True).
LOADERS.setdefault("onnx", "import onnx, sys\nonnx.load(sys.argv[1])\n")
LOADER_REQUIRES.setdefault("onnx", ("onnx",))

IR_VERSION = 8
FLOAT, BOOL, INT64 = 1, 9, 7  # TensorProto.DataType
ATTR_GRAPH = 5  # AttributeProto.AttributeType


def tensor(name: str, values: list[float], *, location: str | None = None) -> bytes:
    """A float TensorProto; with ``location``, its bytes live in that external file."""
    raw = struct.pack(f"<{len(values)}f", *values)
    fields = [packed(1, [len(values)]), field(2, FLOAT), field(8, name)]
    if location is None:
        fields.append(field(9, raw))
    else:
        fields.append(
            string_map(13, {"location": location, "offset": "0", "length": str(len(raw))})
        )
        fields.append(field(14, 1))  # data_location = EXTERNAL
    return message(*fields)


def value_info(name: str, elem_type: int = FLOAT, dims: tuple[int, ...] = (2,)) -> bytes:
    shape = message(*(field(1, field(1, d)) for d in dims))
    tensor_type = message(field(1, elem_type), field(2, shape))
    return message(field(1, name), field(2, field(1, tensor_type)))


def node(
    op: str,
    inputs: list[str],
    outputs: list[str],
    *,
    name: str = "",
    domain: str = "",
    attributes: tuple[bytes, ...] = (),
) -> bytes:
    return message(
        *(field(1, i) for i in inputs),
        *(field(2, o) for o in outputs),
        field(3, name or op.lower()),
        field(4, op),
        *(field(5, a) for a in attributes),
        *([field(7, domain)] if domain else []),
    )


def graph_attribute(name: str, graph: bytes) -> bytes:
    return message(field(1, name), field(6, graph), field(20, ATTR_GRAPH))


def graph(
    name: str,
    nodes: list[bytes],
    *,
    inputs: list[bytes],
    outputs: list[bytes],
    initializers: Sequence[bytes] = (),
) -> bytes:
    return message(
        *(field(1, n) for n in nodes),
        field(2, name),
        *(field(5, t) for t in initializers),
        *(field(11, i) for i in inputs),
        *(field(12, o) for o in outputs),
    )


def model(
    graph_bytes: bytes, *, opsets: dict[str, int] | None = None, functions: Sequence[bytes] = ()
) -> bytes:
    opsets = opsets if opsets is not None else {"": 13}
    return message(
        field(1, IR_VERSION),
        field(2, "trainguard-samples"),
        field(3, "1.0"),
        field(7, graph_bytes),
        *(field(8, message(field(1, d), field(2, v))) for d, v in opsets.items()),
        *(field(25, f) for f in functions),
    )


def _add_relu(bias: bytes) -> bytes:
    """W = Relu(X + B), with the bias B given as an initializer tensor."""
    return graph(
        "add_relu",
        [node("Add", ["X", "B"], ["Z"]), node("Relu", ["Z"], ["W"])],
        inputs=[value_info("X")],
        outputs=[value_info("W")],
        initializers=[bias],
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- benign ----------------------------------------------------------------------------


@benign(
    "onnx-add-relu",
    "ONNX model: Add with an initializer, then Relu",
    "a plain ModelProto: ir_version, producer, graph, opset_import",
    loader="onnx",
)
def build_onnx_plain(out: Path, canary: Path) -> Path:
    return _write(out / "add_relu.onnx", model(_add_relu(tensor("B", [0.5, -0.5]))))


@benign(
    "onnx-external-data-beside",
    "ONNX model whose initializer lives in a file beside it",
    "external data as large models store it: a relative location inside the model folder",
    loader="onnx",
)
def build_onnx_external(out: Path, canary: Path) -> Path:
    (out / "add_relu_weights.bin").write_bytes(struct.pack("<2f", 0.5, -0.5))
    bias = tensor("B", [0.5, -0.5], location="add_relu_weights.bin")
    return _write(out / "add_relu_external.onnx", model(_add_relu(bias)))


@benign(
    "onnx-if-subgraphs-and-function",
    "ONNX model with If subgraphs and a model-local function",
    "nested graphs are walked; a domain defined by the model's own functions is not custom",
    loader="onnx",
)
def build_onnx_nested(out: Path, canary: Path) -> Path:
    then_branch = graph("then", [node("Relu", ["X"], ["T"])], inputs=[], outputs=[value_info("T")])
    else_branch = graph("else", [node("Neg", ["X"], ["E"])], inputs=[], outputs=[value_info("E")])
    double = message(
        field(1, "Double"),
        field(4, "A"),
        field(5, "D"),
        field(7, node("Add", ["A", "A"], ["D"])),
        field(9, message(field(1, ""), field(2, 13))),
        field(10, "local.functions"),
    )
    body = graph(
        "if_model",
        [
            node(
                "If",
                ["C"],
                ["Y"],
                attributes=(
                    graph_attribute("then_branch", then_branch),
                    graph_attribute("else_branch", else_branch),
                ),
            ),
            node("Double", ["Y"], ["W"], domain="local.functions"),
        ],
        inputs=[value_info("X"), value_info("C", BOOL, (1,))],
        outputs=[value_info("W")],
    )
    data = model(body, opsets={"": 13, "local.functions": 1}, functions=[double])
    return _write(out / "if_function.onnx", data)


@benign(
    "onnx-custom-operator",
    "ONNX model calling an operator from a custom domain",
    "custom operators need a native library the user loads: worth a look, not an attack",
    loader="onnx",
    expect="medium",
)
def build_onnx_custom(out: Path, canary: Path) -> Path:
    body = graph(
        "custom",
        [node("FastGelu", ["X"], ["W"], domain="com.example.kernels")],
        inputs=[value_info("X")],
        outputs=[value_info("W")],
    )
    return _write(out / "custom_op.onnx", model(body, opsets={"": 13, "com.example.kernels": 1}))


# -- malicious -------------------------------------------------------------------------


@malicious(
    "onnx-external-data-traversal",
    "ONNX initializer whose external data path climbs out of the model folder",
    "onnx.load reads, and onnx.save writes, the file a tensor's location names; the "
    "location here leads to the canary's path",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2024-27318",
    loader="onnx",
    fires=False,
)
def build_onnx_traversal(out: Path, canary: Path) -> Path:
    location = os.path.relpath(canary, out)
    if not location.startswith(".."):  # the canary sits inside: climb out and back in
        location = os.path.join("..", out.name, location)
    bias = tensor("B", [0.5, -0.5], location=location)
    return _write(out / "traversal.onnx", model(_add_relu(bias)))


@malicious(
    "onnx-external-data-absolute",
    "ONNX initializer whose external data location is an absolute path",
    "an absolute location reads or writes any file the user can reach",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2022-25882",
    loader="onnx",
    fires=False,
)
def build_onnx_absolute(out: Path, canary: Path) -> Path:
    bias = tensor("B", [0.5, -0.5], location=str(canary.resolve()))
    return _write(out / "absolute.onnx", model(_add_relu(bias)))


@malicious(
    "onnx-traversal-in-loop-body",
    "Path traversal hidden in an initializer of a Loop body subgraph",
    "scanners that read only the top-level graph miss tensors of nested graphs",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2024-27318",
    loader="onnx",
    fires=False,
)
def build_onnx_nested_traversal(out: Path, canary: Path) -> Path:
    location = "../" * 6 + "etc/hostname"
    loop_body = graph(
        "body",
        [node("Identity", ["cond_in"], ["cond_out"]), node("Add", ["acc_in", "K"], ["acc_out"])],
        inputs=[value_info("i", INT64, ()), value_info("cond_in", BOOL, ()), value_info("acc_in")],
        outputs=[value_info("cond_out", BOOL, ()), value_info("acc_out")],
        initializers=[tensor("K", [1.0, 1.0], location=location)],
    )
    body = graph(
        "loop_model",
        [node("Loop", ["N", "", "X"], ["W"], attributes=(graph_attribute("body", loop_body),))],
        inputs=[value_info("N", INT64, ()), value_info("X")],
        outputs=[value_info("W")],
    )
    return _write(out / "loop_traversal.onnx", model(body))


@malicious(
    "onnx-python-op",
    "ONNX model using ONNX Runtime's PythonOp",
    "com.microsoft::PythonOp calls a Python function registered in the loading process",
    loader="onnx",
    fires=False,
    expect="high",
)
def build_onnx_python_op(out: Path, canary: Path) -> Path:
    attr = message(field(1, "func_name"), field(4, "os.system"), field(20, 3))
    body = graph(
        "python_op",
        [node("PythonOp", ["X"], ["W"], domain="com.microsoft", attributes=(attr,))],
        inputs=[value_info("X")],
        outputs=[value_info("W")],
    )
    return _write(out / "python_op.onnx", model(body, opsets={"": 13, "com.microsoft": 1}))
