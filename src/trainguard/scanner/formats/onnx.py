"""ONNX models: external-data paths, custom operator domains and nested graphs.

An ONNX file is a ModelProto.  ONNX operators cannot run code, but a tensor
may keep its bytes in another file (``data_location = EXTERNAL`` with an
``external_data`` entry ``location``).  A location that is absolute or climbs
out of the model's folder makes ``onnx.load`` read, and ``onnx.save`` write,
any file the user can reach (CVE-2022-25882, CVE-2024-27318).  Operators from
domains outside the ONNX standard and ONNX Runtime's own need a custom
operator library the user must load.  Subgraphs (If, Loop, Scan attributes),
training graphs and model-local functions are walked too, to a bounded depth.

ONNX has no magic number; a file is taken for ONNX when its first fields are
ModelProto's (ir_version, producer strings, graph, opset_import) with the
right wire types, checked as deep as the first 4 KiB go.
"""

from __future__ import annotations

import ntpath
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

from trainguard.errors import LimitExceeded
from trainguard.findings import Finding
from trainguard.rules import finding_with
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats import protobuf
from trainguard.scanner.formats.protobuf import (
    I32,
    LEN,
    PACKABLE,
    VARINT,
    Message,
    ProtoError,
    Schema,
)

ADVISORY_EXTERNAL = "https://nvd.nist.gov/vuln/detail/CVE-2024-27318"
# The ONNX standard's domains and ONNX Runtime's built-in ones.
STANDARD_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.training",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)
# ONNX Runtime (training) operators that call Python functions registered in the process.
PYTHON_OPS = frozenset({("com.microsoft", "PythonOp"), ("com.microsoft", "PythonOpGrad")})
_MAX_EXAMPLES = 5

# -- schemas, for sniffing ------------------------------------------------------

_S = None
_TENSOR: Schema = {
    1: (PACKABLE, _S),
    2: (VARINT, _S),
    3: (LEN, _S),
    4: (PACKABLE, _S),
    5: (PACKABLE, _S),
    6: (LEN, _S),
    7: (PACKABLE, _S),
    8: (LEN, _S),
    9: (LEN, _S),
    10: (PACKABLE, _S),
    11: (PACKABLE, _S),
    12: (LEN, _S),
    13: (LEN, _S),
    14: (VARINT, _S),
}
_ATTRIBUTE: Schema = {
    1: (LEN, _S),
    2: (I32, _S),
    3: (VARINT, _S),
    4: (LEN, _S),
    5: (LEN, _TENSOR),
    6: (LEN, _S),
    7: (PACKABLE, _S),
    8: (PACKABLE, _S),
    9: (LEN, _S),
    10: (LEN, _S),
    11: (LEN, _S),
    13: (LEN, _S),
    20: (VARINT, _S),
    21: (LEN, _S),
}
_NODE: Schema = {
    1: (LEN, _S),
    2: (LEN, _S),
    3: (LEN, _S),
    4: (LEN, _S),
    5: (LEN, _ATTRIBUTE),
    6: (LEN, _S),
    7: (LEN, _S),
}
_VALUE_INFO: Schema = {1: (LEN, _S), 2: (LEN, _S), 3: (LEN, _S)}
_GRAPH: Schema = {
    1: (LEN, _NODE),
    2: (LEN, _S),
    5: (LEN, _TENSOR),
    10: (LEN, _S),
    11: (LEN, _VALUE_INFO),
    12: (LEN, _VALUE_INFO),
    13: (LEN, _VALUE_INFO),
    15: (LEN, _S),
}
_OPSET: Schema = {1: (LEN, _S), 2: (VARINT, _S)}
MODEL: Schema = {
    1: (VARINT, _S),
    2: (LEN, _S),
    3: (LEN, _S),
    4: (LEN, _S),
    5: (VARINT, _S),
    6: (LEN, _S),
    7: (LEN, _GRAPH),
    8: (LEN, _OPSET),
    14: (LEN, _S),
    20: (LEN, _S),
    25: (LEN, _S),
}
_MAX_IR_VERSION = 64  # ONNX is at 11 in 2025; a larger first varint is not an ONNX file


class OnnxFormat:
    name = "onnx"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        p = protobuf.plausible(head, MODEL, blob.size)
        if not p.ok or not 1 <= p.first_varints.get(1, 1) <= _MAX_IR_VERSION:
            return False
        if 1 in p.top:  # writers put ir_version first; then graph or opset should follow
            return bool(p.top & {7, 8}) and p.known >= 3
        return 7 in p.top and p.known >= 6  # fields reordered: ask for more evidence

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            try:
                buf = protobuf.load_buffer(f, ctx.limits.max_in_memory_member)
            except LimitExceeded as exc:
                yield finding_with("TG002", f"ONNX model: {exc}")
                return
        walk = _Walk(ctx)
        try:
            walk.model(Message.parse(buf, ctx.limits))
        except LimitExceeded as exc:
            walk.findings.append(finding_with("TG002", f"ONNX model: {exc}"))
        except ProtoError as exc:
            walk.findings.append(finding_with("TG003", f"malformed ONNX protobuf: {exc}"))
        finally:
            protobuf.close_buffer(buf)
        yield from walk.findings
        yield from walk.domain_findings()


@dataclass
class _Walk:
    ctx: ScanContext
    findings: list[Finding] = field(default_factory=list)
    # custom domain -> "op_type at graph path" examples
    custom: dict[str, list[str]] = field(default_factory=dict)
    local_functions: set[tuple[str, str]] = field(default_factory=set)

    def model(self, model: Message) -> None:
        for fn in model.messages(25):
            self.local_functions.add((fn.string(10), fn.string(1)))
        for graph in model.messages(7):
            self.graph(graph, "graph", 0)
        for i, training in enumerate(model.messages(20)):
            for number, part in ((1, "initialization"), (2, "algorithm")):
                for graph in training.messages(number):
                    self.graph(graph, f"training_info[{i}].{part}", 0)
        for fn in model.messages(25):
            where = f"function {fn.string(10)}::{fn.string(1)}"
            for node in fn.messages(7):
                self.node(node, where, 0)

    def graph(self, graph: Message, where: str, depth: int) -> None:
        if depth > self.ctx.limits.max_graph_depth:
            raise LimitExceeded("ONNX subgraph depth", self.ctx.limits.max_graph_depth)
        for tensor in graph.messages(5):
            self.tensor(tensor, f"{where} initializer")
        for sparse in graph.messages(15):
            for number in (1, 2):  # values, indices
                for tensor in sparse.messages(number):
                    self.tensor(tensor, f"{where} sparse initializer")
        for node in graph.messages(1):
            self.node(node, where, depth)

    def node(self, node: Message, where: str, depth: int) -> None:
        op, domain = node.string(4), node.string(7)
        label = f"{where}/{node.string(3) or op}"
        if (domain, op) in PYTHON_OPS:
            self.findings.append(
                finding_with(
                    "TG1113",
                    f"operator {domain}::{op} calls a Python function registered in the "
                    f"loading process ({label})",
                    trigger=op,
                    node=label,
                )
            )
        elif domain not in STANDARD_DOMAINS and (domain, op) not in self.local_functions:
            examples = self.custom.setdefault(domain, [])
            examples.append(f"{op} at {label}")
        for attr in node.messages(5):
            name = attr.string(1)
            for tensor in attr.messages(5):
                self.tensor(tensor, f"{label}.{name}")
            for tensor in attr.messages(10):
                self.tensor(tensor, f"{label}.{name}")
            for number in (22, 23):  # sparse_tensor(s): values and indices are tensors
                for sparse in attr.messages(number):
                    for part in (1, 2):
                        for tensor in sparse.messages(part):
                            self.tensor(tensor, f"{label}.{name}")
            for sub in attr.messages(6):
                self.graph(sub, f"{label}.{name}", depth + 1)
            for sub in attr.messages(11):
                self.graph(sub, f"{label}.{name}", depth + 1)

    def tensor(self, tensor: Message, where: str) -> None:
        entries = tensor.string_map(13)
        if tensor.varint(14) != 1 and not entries:  # 1: DataLocation.EXTERNAL
            return
        location = entries.get("location", "")
        problem = external_location_problem(location)
        if problem:
            name = tensor.string(8)
            self.findings.append(
                finding_with(
                    "TG1111",
                    f"tensor {name!r} ({where}) takes its data from {location!r}, {problem}",
                    trigger=location,
                    advisory=ADVISORY_EXTERNAL,
                    tensor=name,
                )
            )

    def domain_findings(self) -> Iterator[Finding]:
        for domain, examples in sorted(self.custom.items()):
            more = (
                f" (+{len(examples) - _MAX_EXAMPLES} more)" if len(examples) > _MAX_EXAMPLES else ""
            )
            yield finding_with(
                "TG1112",
                f"{len(examples)} operator(s) from the custom domain {domain!r} need a custom "
                f"operator library: {', '.join(examples[:_MAX_EXAMPLES])}{more}",
                trigger=domain,
            )


def external_location_problem(location: str) -> str:
    """Why an external-data location is unsafe, or "" if it stays beside the model."""
    if not location:
        return "an empty path"
    if "\x00" in location:
        return "a path with a NUL byte"
    if location.startswith(("/", "\\")) or ntpath.splitdrive(location)[0]:
        return "an absolute path outside the model's folder"
    if location.startswith("~"):
        return "a path in a home folder, outside the model's folder"
    # Normalise both separators: Windows readers split on either.
    norm = posixpath.normpath(location.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return "a path that climbs out of the model's folder"
    return ""
