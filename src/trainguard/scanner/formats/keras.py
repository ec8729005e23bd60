"""Keras model configs: the JSON that decides which code a Keras load runs.

A Keras v3 ``.keras`` file is a zip holding ``config.json``, ``metadata.json``
and ``model.weights.h5``; legacy HDF5 files keep the same kind of JSON in a
``model_config`` attribute, and TensorFlow SavedModels in ``keras_metadata.pb``.
Every object in that JSON names what Keras should build: ``module`` and
``class_name`` (or a function name in ``config``), plus a ``registered_name``
for custom objects.  Keras imports ``module`` when it is not its own (before
3.9, any module at all: CVE-2025-1550), and Lambda layers carry marshalled
bytecode that runs once ``safe_mode`` is off.  We read the JSON only (size
capped before ``json.loads``), never the weights, and never import a name.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
from collections.abc import Iterator
from typing import BinaryIO

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner import ziplenient
from trainguard.scanner.base import Blob, ScanContext

ADVISORY_LAMBDA = "https://nvd.nist.gov/vuln/detail/CVE-2024-3660"
ADVISORY_MODULE = "https://nvd.nist.gov/vuln/detail/CVE-2025-1550"
ADVISORY_GADGET = "https://nvd.nist.gov/vuln/detail/CVE-2025-8747"
ADVISORY_TFSM = "https://nvd.nist.gov/vuln/detail/CVE-2026-1462"

# Public Keras namespaces that hold only modelling objects.
_PUBLIC_MODULES = frozenset(
    {
        "keras",
        "keras.layers",
        "keras.models",
        "keras.initializers",
        "keras.regularizers",
        "keras.constraints",
        "keras.optimizers",
        "keras.optimizers.schedules",
        "keras.losses",
        "keras.metrics",
        "keras.activations",
        "keras.dtype_policies",
        "keras.mixed_precision",
        "keras.ops",
        "keras.quantizers",
        "keras.random",
    }
)
# keras.src.<package>...: where Keras 3 itself records classes that have no
# public name (Functional, backend optimizers, ops in functional graphs).
_SRC_PACKAGES = frozenset(
    {
        "models",
        "layers",
        "ops",
        "optimizers",
        "losses",
        "metrics",
        "initializers",
        "regularizers",
        "constraints",
        "dtype_policies",
        "activations",
        "quantizers",
        "random",
        "engine",
    }
)
# Packages Keras itself agrees to import classes from (KerasSaveable only).
_ECOSYSTEM = frozenset({"keras_hub", "keras_cv", "keras_nlp", "keras_rs"})
# Keras functions that do I/O or change Keras' own safety settings; a config
# naming one is an attack whatever its module (CVE-2025-8747 used get_file).
_NON_MODELING = frozenset(
    {
        "get_file",
        "load_model",
        "save_model",
        "load_weights",
        "save_weights",
        "model_from_json",
        "model_from_config",
        "enable_unsafe_deserialization",
        "deserialize_keras_object",
        "serialize_keras_object",
        "register_keras_serializable",
        "clear_session",
        "load_img",
        "save_img",
        "image_dataset_from_directory",
        "text_dataset_from_directory",
        "audio_dataset_from_directory",
        "timeseries_dataset_from_array",
    }
)
# Names Keras resolves to data, not code.
_DATA_CLASSES = frozenset(
    {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__"}
)
_PY_BUILTINS = frozenset(dir(builtins))
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CODE_NAMES = re.compile(rb"[A-Za-z_][A-Za-z0-9_.]{2,63}")


def _finding(rule_id: str, message: str, member: str, path: str, **evidence: str) -> Finding:
    return finding(
        rule_id,
        message,
        member=member,
        trigger=path,
        evidence={k: v for k, v in evidence.items() if v},
    )


# -- the .keras zip --------------------------------------------------------------


class KerasZipFlavour:
    """Recognises a Keras v3 archive among zips: a top-level config.json.

    Keras deserializes config.json (running whatever it names) before it
    looks for the weights, so a ``.keras`` file stripped down to config.json
    still attacks; any zip with a config.json is checked.  Unreadable JSON is
    a finding only when the zip also has Keras' other members.
    """

    name = "keras"
    members = frozenset({"model.weights.h5", "model.weights.npz", "metadata.json"})

    def matches(self, names: frozenset[str]) -> bool:
        return "config.json" in names

    def scan(
        self, ctx: ScanContext, blob: Blob, f: BinaryIO, directory: ziplenient.ZipDirectory
    ) -> Iterator[Finding]:
        keras_like = any(e.name in self.members for e in directory.entries)
        # Every entry named config.json: readers disagree on duplicates (TG204).
        for entry in directory.entries:
            if entry.name != "config.json":
                continue
            member = f"{blob.name}/{entry.name}" if blob.name else entry.name
            if entry.size > ctx.limits.max_model_config:
                yield _finding(
                    "TG002",
                    f"config.json of {entry.size} bytes exceeds the limit of "
                    f"{ctx.limits.max_model_config}; not analysed",
                    member,
                    "",
                )
                continue
            with ziplenient.open_member(f, entry, ctx.limits) as m:
                data = m.read(ctx.limits.max_model_config + 1)
            for found in check_config_bytes(ctx, data, member, "config.json"):
                if keras_like or found.rule != "TG003":
                    yield found


# -- the JSON --------------------------------------------------------------------


def check_config_bytes(ctx: ScanContext, data: bytes, member: str, what: str) -> Iterator[Finding]:
    """Findings for one serialized Keras config (``what`` names it in messages)."""
    if len(data) > ctx.limits.max_model_config:
        yield _finding(
            "TG002",
            f"{what} exceeds the limit of {ctx.limits.max_model_config} bytes; not analysed",
            member,
            "",
        )
        return
    try:
        config = json.loads(data)
    except RecursionError:
        yield _finding("TG003", f"{what} is nested too deeply to analyse", member, "")
        return
    except (ValueError, UnicodeDecodeError) as exc:
        yield _finding("TG003", f"{what} is not valid JSON: {exc}", member, "")
        return
    yield from check_config(ctx, config, member)


def check_config(ctx: ScanContext, config: object, member: str) -> Iterator[Finding]:
    """Walk a decoded config; report every object that leads Keras to run code."""
    stack: list[tuple[str, object]] = [("$", config)]
    seen = 0
    reported_lambdas: set[int] = set()
    while stack:
        path, node = stack.pop()
        seen += 1
        if seen > ctx.limits.max_config_nodes:
            yield _finding(
                "TG002",
                f"config has more than {ctx.limits.max_config_nodes} values; the rest "
                "was not analysed",
                member,
                path,
            )
            return
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str) and id(node) not in reported_lambdas:
                yield from _check_object(ctx, node, path, member, reported_lambdas)
            children = [(f"{path}.{k}", v) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))


def _check_object(
    ctx: ScanContext, node: dict[str, object], path: str, member: str, lambdas: set[int]
) -> Iterator[Finding]:
    class_name = str(node["class_name"])
    module = node.get("module")
    registered = node.get("registered_name")
    inner = node.get("config")
    evidence = {
        "module": module if isinstance(module, str) else "",
        "class_name": class_name,
        "registered_name": registered if isinstance(registered, str) else "",
    }
    if class_name == "Lambda" or class_name == "__lambda__":
        function = inner.get("function") if isinstance(inner, dict) else None
        if isinstance(function, dict):
            lambdas.add(id(function))  # the same code, reported here once
        code = _lambda_code(function if class_name == "Lambda" else node)
        what = "Lambda layer" if class_name == "Lambda" else "serialized lambda"
        names = ", ".join(_code_names(code)) if code else ""
        msg = f"{what} carries Python code that Keras runs when safe_mode is off"
        if names:
            msg += f" (marshalled bytecode naming {names})"
        yield _finding(
            "TG1001", msg, member, path, advisory=ADVISORY_LAMBDA, code_names=names, **evidence
        )
    elif class_name == "TFSMLayer":
        target = inner.get("filepath") if isinstance(inner, dict) else None
        yield _finding(
            "TG1003",
            f"TFSMLayer loads the TensorFlow SavedModel at {target!r} and runs its graph",
            member,
            path,
            advisory=ADVISORY_TFSM,
            filepath=str(target),
            **evidence,
        )
    elif class_name == "TorchModuleWrapper" and isinstance(inner, dict):
        yield from _torch_module(ctx, inner, path, member, evidence)
    if isinstance(module, str):
        yield from _check_reference(ctx, module, class_name, inner, path, member, evidence)


def _check_reference(
    ctx: ScanContext,
    module: str,
    class_name: str,
    inner: object,
    path: str,
    member: str,
    evidence: dict[str, str],
) -> Iterator[Finding]:
    if class_name in _DATA_CLASSES:
        return
    is_function = class_name == "function"
    name = inner if is_function and isinstance(inner, str) else class_name
    if is_function and not isinstance(inner, str):
        name = evidence["registered_name"] or ""
    qualified = f"{module}.{name}"
    if module == "builtins" and is_function and name not in _PY_BUILTINS:
        return  # Keras looks such names up among its own functions and registered ones only
    if not _IDENTIFIER.match(name):
        yield _finding(
            "TG1002",
            f"config names {qualified!r}, which is not a Python name",
            member,
            path,
            advisory=ADVISORY_MODULE,
            **evidence,
        )
        return
    if name in _NON_MODELING:
        yield _finding(
            "TG1002",
            f"config calls {qualified}, a Keras function that reads or writes files or "
            "changes Keras' safety settings (the CVE-2025-8747 gadget class)",
            member,
            path,
            advisory=ADVISORY_GADGET,
            **evidence,
        )
        return
    if module == "builtins":
        yield _finding(
            "TG1002",
            f"config names the Python builtin {name!r}; Keras before 3.9 resolves it "
            "and calls it while loading",
            member,
            path,
            advisory=ADVISORY_MODULE,
            **evidence,
        )
        return
    if qualified in ctx.allow or module in ctx.allow:
        return
    package = module.split(".", 1)[0]
    if package == "keras":
        if _is_modelling_module(module):
            return
        yield _finding(
            "TG1002",
            f"config reaches {qualified}, Keras code outside its layers, losses, metrics "
            "and optimizers; such references are how safe_mode has been bypassed",
            member,
            path,
            advisory=ADVISORY_GADGET,
            **evidence,
        )
    elif package in _ECOSYSTEM:
        yield _finding(
            "TG1004",
            f"config builds {qualified} from the installed {package} package",
            member,
            path,
            **evidence,
        )
    else:
        yield _finding(
            "TG1002",
            f"config makes Keras import {module} and use {name}: code outside Keras runs "
            "while the model loads (safe_mode does not stop this before Keras 3.9)",
            member,
            path,
            advisory=ADVISORY_MODULE,
            **evidence,
        )


def _is_modelling_module(module: str) -> bool:
    if module in _PUBLIC_MODULES:
        return True
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "src":
        if parts[2] in _SRC_PACKAGES:
            return True
        # keras.src.backend.<backend>.optimizers...: the backend's optimizer classes.
        return parts[2] == "backend" and "optimizers" in parts[3:]
    return False


def _torch_module(
    ctx: ScanContext, inner: dict[str, object], path: str, member: str, evidence: dict[str, str]
) -> Iterator[Finding]:
    encoded = inner.get("module")
    if not isinstance(encoded, str):
        return
    yield _finding(
        "TG1005",
        "TorchModuleWrapper carries a pickled torch module, unpickled with torch.load("
        "weights_only=False) when safe_mode is off",
        member,
        path,
        **evidence,
    )
    try:
        data = base64.b64decode(encoded[: ctx.limits.max_model_config], validate=False)
    except (binascii.Error, ValueError):
        return
    yield from ctx.scan_nested_bytes(data, f"{member}#{path}")


def _lambda_code(function: object) -> bytes:
    """The marshalled bytecode of a serialized lambda, if any (never unmarshalled)."""
    text: object = None
    if isinstance(function, dict):
        inner = function.get("config")
        if isinstance(inner, dict):
            text = inner.get("code", inner.get("value"))
        elif function.get("class_name") == "__tuple__":  # tf.keras: (code, defaults, closure)
            text = function.get("items")
        if isinstance(text, list) and text:  # func_dump's (code, defaults, closure)
            text = text[0]
    elif isinstance(function, list) and function:  # Keras 2: [code, defaults, closure]
        text = function[0]
    elif isinstance(function, str):
        text = function
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text[: 4 * 1024 * 1024], validate=False)
    except (binascii.Error, ValueError):
        return text.encode("utf-8", "replace")  # Python source, kept as is


def _code_names(code: bytes) -> list[str]:
    """Identifiers visible in bytecode (marshal keeps names as plain ASCII)."""
    names = [m.group().decode("ascii") for m in _CODE_NAMES.finditer(code)]
    return list(dict.fromkeys(n for n in names if not n.startswith("<")))[:12]
