"""TensorFlow SavedModel: ``saved_model.pb`` and ``keras_metadata.pb``, without TensorFlow.

A SavedModel is a program: its graph and function library run when a
signature is called, and the restore function runs while ``tf.saved_model.load``
restores variables.  TensorFlow ships operations that read and write files,
call back into Python or talk to other hosts; a model has no business using
most of them outside the standard checkpoint functions.  We walk every
MetaGraphDef's nodes and every function of its library with our own protobuf
reader and report those operations, and check the Keras JSON kept in
``keras_metadata.pb`` and the object graph with the Keras checks.

Neither file has a magic number.  A ``saved_model.pb`` is recognised by its
structure: field 1 the schema version (1), field 2 MetaGraphDef messages whose
first fields match the schema below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from trainguard.errors import LimitExceeded
from trainguard.findings import Finding
from trainguard.rules import finding_with
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats import keras, protobuf
from trainguard.scanner.formats.protobuf import LEN, VARINT, Message, ProtoError, Schema

# Operations, by what they reach.  Sources: TensorFlow's op registry and the
# abuse study of TensorFlow APIs (TensorAbuse, ZJU-SEC 2024).
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
WRITE_OPS = frozenset(
    {
        "WriteFile",
        "Save",
        "SaveV2",
        "SaveSlices",
        "MergeV2Checkpoints",
        "SaveDataset",
        "SaveDatasetV2",
        "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "DistributedSave",
        "SnapshotDataset",
        "SnapshotDatasetV2",
        "CacheDatasetV2",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
    }
)
READ_OPS = frozenset(
    {
        "ReadFile",
        "MatchingFiles",
        "MatchingFilesDataset",
        "ExperimentalMatchingFilesDataset",
        "ImmutableConst",
        "WholeFileReader",
        "WholeFileReaderV2",
        "TextLineReader",
        "TextLineReaderV2",
        "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2",
        "TFRecordReader",
        "TFRecordReaderV2",
        "LMDBReader",
        "TextLineDataset",
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "CSVDataset",
        "CSVDatasetV2",
        "ExperimentalCSVDataset",
        "LMDBDataset",
        "ExperimentalLMDBDataset",
        "SqlDataset",
        "ExperimentalSqlDataset",
        "LoadDataset",
        "Restore",
        "RestoreV2",
        "RestoreSlice",
    }
)
NETWORK_OPS = frozenset(
    {
        "RpcCall",
        "RpcClient",
        "RpcServer",
        "RpcServerRegister",
        "RpcServerStart",
        "RegisterDataset",
        "RegisterDatasetV2",
        "DataServiceDataset",
        "DataServiceDatasetV2",
        "DataServiceDatasetV3",
        "DataServiceDatasetV4",
    }
)
# Debug ops send tensors wherever their debug_urls say (grpc:// or file://).
DEBUG_OPS = frozenset(
    {
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugIdentityV3",
        "DebugNanCount",
        "DebugNumericSummary",
        "DebugNumericSummaryV2",
        "Copy",
        "CopyHost",
    }
)
# What every SavedModel's save and restore functions use.
CHECKPOINT_OPS = frozenset(
    {"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore", "RestoreV2", "RestoreSlice"}
)
_MAX_EXAMPLES = 5

_Walker = Callable[[ScanContext, Message], Iterator[Finding]]

# -- schemas, for sniffing ------------------------------------------------------

_S = None  # a scalar, string or bytes field
_OP_DEF: Schema = {1: (LEN, _S), 2: (LEN, _S), 3: (LEN, _S), 4: (LEN, _S)}
_META_INFO: Schema = {
    1: (LEN, _S),
    2: (LEN, {1: (LEN, _OP_DEF)}),
    3: (LEN, _S),
    4: (LEN, _S),
    5: (LEN, _S),
    6: (LEN, _S),
    7: (VARINT, _S),
    8: (LEN, _S),
}
_NODE_DEF: Schema = {1: (LEN, _S), 2: (LEN, _S), 3: (LEN, _S), 4: (LEN, _S), 5: (LEN, _S)}
_GRAPH_DEF: Schema = {1: (LEN, _NODE_DEF), 2: (LEN, _S), 3: (VARINT, _S), 4: (LEN, _S)}
_META_GRAPH: Schema = {
    1: (LEN, _META_INFO),
    2: (LEN, _GRAPH_DEF),
    3: (LEN, _S),
    4: (LEN, _S),
    5: (LEN, _S),
    6: (LEN, _S),
    7: (LEN, _S),
}
SAVED_MODEL: Schema = {1: (VARINT, _S), 2: (LEN, _META_GRAPH)}
_KERAS_OBJECT: Schema = {2: (VARINT, _S), 3: (LEN, _S), 4: (LEN, _S), 5: (LEN, _S), 6: (LEN, _S)}
KERAS_METADATA: Schema = {1: (LEN, _KERAS_OBJECT)}


class SavedModelFormat:
    name = "savedmodel"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        p = protobuf.plausible(head, SAVED_MODEL, blob.size)
        return (
            p.ok
            and p.top <= {1, 2}
            and 2 in p.top
            and p.first_varints.get(1, 1) == 1
            and p.known >= 4
        )

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            try:
                buf = protobuf.load_buffer(f, ctx.limits.max_in_memory_member)
            except LimitExceeded as exc:
                yield finding_with("TG002", f"saved_model.pb: {exc}")
                return
        try:
            yield from _parse_guarded(ctx, buf, _scan_saved_model)
        finally:
            protobuf.close_buffer(buf)


class KerasMetadataFormat:
    """``keras_metadata.pb``: the Keras layer configs of a Keras-made SavedModel."""

    name = "keras-metadata"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        p = protobuf.plausible(head, KERAS_METADATA, blob.size)
        return p.ok and p.top == {1} and p.known >= 3 and b"_tf_keras" in head

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            try:
                buf = protobuf.load_buffer(f, ctx.limits.max_in_memory_member)
            except LimitExceeded as exc:
                yield finding_with("TG002", f"keras_metadata.pb: {exc}")
                return
        try:
            yield from _parse_guarded(ctx, buf, _scan_keras_metadata)
        finally:
            protobuf.close_buffer(buf)


def _parse_guarded(ctx: ScanContext, buf: protobuf.Buffer, walk: _Walker) -> Iterator[Finding]:
    """Run ``walk``; a limit or damage is a finding after whatever was found before it."""
    try:
        yield from walk(ctx, Message.parse(buf, ctx.limits))
    except LimitExceeded as exc:
        yield finding_with("TG002", f"protobuf: {exc}")
    except ProtoError as exc:
        yield finding_with("TG003", f"malformed protobuf: {exc}")


# -- saved_model.pb ---------------------------------------------------------------


@dataclass
class _Hits:
    """Operations seen, grouped so that one finding says 'N nodes', not N findings."""

    nodes: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    detail: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, rule_id: str, op: str, where: str, detail: str = "") -> None:
        seen = self.nodes.setdefault((rule_id, op), [])
        seen.append(where)
        if detail and (rule_id, op) not in self.detail:
            self.detail[(rule_id, op)] = detail


def _scan_saved_model(ctx: ScanContext, msg: Message) -> Iterator[Finding]:
    hits = _Hits()
    for index, meta in enumerate(msg.messages(2)):
        tags = ",".join(info_tags for info in meta.messages(1) for info_tags in info.strings(4))
        label = f"meta_graph[{index}]" + (f" ({tags})" if tags else "")
        saver_scopes = {
            name.split("/", 1)[0] + "/"
            for saver in meta.messages(3)
            for name in (saver.string(1), saver.string(2), saver.string(3))
            if "/" in name
        }
        for graph in meta.messages(2):
            for node in graph.messages(1):
                _check_node(node, f"{label} graph", saver_scopes, hits)
            for library in graph.messages(2):
                for function in library.messages(1):
                    name = next((s.string(1) for s in function.messages(1)), "")
                    standard = _is_checkpoint_function(name)
                    for node in function.messages(3):
                        _check_node(node, f"{label} function {name}", set(), hits, standard)
        for objects in meta.messages(7):
            yield from _object_graph(ctx, objects, label)
    yield from _report(hits)


def _is_checkpoint_function(name: str) -> bool:
    # TF2 traces the checkpoint functions as __inference__traced_save_<n> and
    # __inference__traced_restore_<n>.
    return "_traced_save_" in name or "_traced_restore_" in name


def _check_node(
    node: Message, where: str, saver_scopes: set[str], hits: _Hits, standard: bool = False
) -> None:
    op = node.string(2)
    name = node.string(1)
    at = f"{where}: {name}"
    if op in CHECKPOINT_OPS and (standard or any(name.startswith(s) for s in saver_scopes)):
        return
    if op in PYTHON_OPS:
        token = _attr_string(node, "token")
        hits.add("TG1101", op, at, f"token {token!r}" if token else "")
    elif op in WRITE_OPS:
        hits.add("TG1102", op, at)
    elif op in READ_OPS:
        detail = _attr_string(node, "memory_region_name")
        hits.add("TG1103", op, at, f"path {detail!r}" if detail else "")
    elif op in NETWORK_OPS:
        hits.add("TG1104", op, at)
    elif op in DEBUG_OPS:
        urls = _attr_strings(node, "debug_urls") + _attr_strings(node, "debug_ops_spec")
        urls = [u for u in urls if "://" in u]
        if urls:
            hits.add("TG1104", op, at, "sends tensors to " + ", ".join(urls[:3]))
    elif op == "PrintV2":
        stream = _attr_string(node, "output_stream")
        if stream.startswith("file://"):
            hits.add("TG1102", op, at, f"prints into {stream[7:]!r}")


def _attr_values(node: Message, key: str) -> Iterator[Message]:
    for name, value in node.map_entries(5):
        if name == key:
            yield value


def _attr_string(node: Message, key: str) -> str:
    return next((v.string(2) for v in _attr_values(node, key) if v.has(2)), "")


def _attr_strings(node: Message, key: str) -> list[str]:
    # AttrValue.list (field 1) is a ListValue whose field 2 holds the strings.
    return [s for v in _attr_values(node, key) for lst in v.messages(1) for s in lst.strings(2)]


_WHAT = {
    "TG1101": "calls back into Python",
    "TG1102": "writes files",
    "TG1103": "reads files",
    "TG1104": "reaches other hosts",
}


def _report(hits: _Hits) -> Iterator[Finding]:
    for (rule_id, op), places in hits.nodes.items():
        detail = hits.detail.get((rule_id, op), "")
        more = f" (+{len(places) - _MAX_EXAMPLES} more)" if len(places) > _MAX_EXAMPLES else ""
        message = f"operation {op} {_WHAT[rule_id]}: {len(places)} node(s), first in {places[0]}"
        if detail:
            message += f"; {detail}"
        yield finding_with(
            rule_id,
            message,
            trigger=op,
            nodes="; ".join(places[:_MAX_EXAMPLES]) + more,
        )


def _object_graph(ctx: ScanContext, objects: Message, label: str) -> Iterator[Finding]:
    """Keras configs older TensorFlow versions kept in SavedUserObject.metadata."""
    for i, obj in enumerate(objects.messages(1)):
        for user in obj.messages(4):
            for data in _full_strings(user, 3, ctx.limits.max_model_config):
                if data.lstrip().startswith(b"{"):
                    what = f"Keras metadata of {label} object {i}"
                    yield from keras.check_config_bytes(ctx, data, "", what)


# -- keras_metadata.pb -------------------------------------------------------------


def _scan_keras_metadata(ctx: ScanContext, msg: Message) -> Iterator[Finding]:
    # A model's metadata repeats each layer's config (in the model's node and the
    # layer's own): one finding per distinct object, at its first place.
    seen: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
    for obj in msg.messages(1):
        path = obj.string(3) or f"node {obj.varint(2)}"
        for data in _full_strings(obj, 5, ctx.limits.max_model_config):
            for f in keras.check_config_bytes(ctx, data, "", f"metadata of {path}"):
                key = (f.rule, f.message, tuple(sorted(f.evidence.items())))
                if key not in seen:
                    seen.add(key)
                    yield _prefixed(f, path)


def _full_strings(msg: Message, number: int, cap: int) -> Iterator[bytes]:
    for f in msg.fields().get(number, []):
        if f.wire != LEN:
            raise ProtoError(f"field {number} has wire type {f.wire}, expected {LEN}")
        if f.end - f.value > cap:
            raise LimitExceeded("Keras metadata string", cap)
        yield bytes(msg.buf[f.value : f.end])


def _prefixed(f: Finding, path: str) -> Finding:
    return replace(f, trigger=f"{path}:{f.trigger}" if f.trigger else path)
