"""GGUF: the tables are validated with caps, chat templates are analysed, nothing runs.

Structural checks mirror llama.cpp's gguf.cpp, whose parser had heap overflows
on exactly these fields (CVE-2024-21802, CVE-2024-21836, CVE-2025-53630,
CVE-2026-27940: https://github.com/ggml-org/llama.cpp/security/advisories/GHSA-3p4r-fq3f-q74v).  The
malicious samples are proven to run their payload under the way servers
rendered templates (a plain jinja2 Environment), in a subprocess.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard import Severity, scan_bytes, scan_file
from trainguard.limits import Limits
from trainguard.samples import LOADERS, MALICIOUS
from trainguard.samples.fmt_gguf import CHATML, gguf_bytes, read_metadata, sglang_ssti

_W = struct.pack("<8f", *range(8))


def _rules(data: bytes, limits: Limits | None = None) -> dict[str, Severity]:
    result = scan_bytes(data, "t.gguf", limits=limits) if limits else scan_bytes(data, "t.gguf")
    assert result.error is None, result.error
    return {f.rule: f.severity for f in result.findings}


def _model(**meta: object) -> bytes:
    base: dict[str, object] = {"general.architecture": "llama", "tokenizer.chat_template": CHATML}
    base.update(meta)
    return gguf_bytes(base, [("a.weight", [8], _W), ("b.weight", [2, 4], _W)])


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


def _raw(kvs: list[bytes], n_tensors: int = 0, tail: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tail


def _info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    raw = name.encode()
    out = struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
    return (
        out + b"".join(struct.pack("<q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)
    )


def test_clean_model_and_reader_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_model())
    result = scan_file(path)
    assert result.format == "gguf" and result.findings == [], result.findings
    meta = read_metadata(path)
    assert meta["tokenizer.chat_template"] == CHATML and meta["general.architecture"] == "llama"


def test_big_endian_file_is_read() -> None:
    data = b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + struct.pack(">Q", 4) + b"name"
    data += struct.pack(">I", 8) + struct.pack(">Q", 3) + b"big"
    assert _rules(data) == {}


@pytest.mark.parametrize("version", [0, 1, 4])
def test_unsupported_version(version: int) -> None:
    assert _rules(_raw([], version=version)) == {"TG911": Severity.HIGH}


def test_every_truncation_is_reported_without_crash() -> None:
    data = _model()
    tables_end = data.index(b"b.weight") + 40  # the tensor table ends near here
    for cut in range(0, tables_end):
        rules = _rules(data[:cut])
        assert rules, cut  # something is always reported for a cut table
        assert max(rules.values()) >= Severity.HIGH or cut < 4, (cut, rules)


def test_duplicates() -> None:
    dup_key = _raw([_kv("a", 4, struct.pack("<I", 1)), _kv("a", 4, struct.pack("<I", 2))])
    assert _rules(dup_key) == {"TG912": Severity.HIGH}
    infos = _info("w", [8], 0, 0) + _info("w", [8], 0, 32)
    data = _raw([], 2, infos)
    data += b"\0" * (-len(data) % 32) + _W + b"\0" * 32
    assert _rules(data)["TG912"] == Severity.HIGH


def test_tensor_table_violations() -> None:
    def rules_for(
        infos: bytes, n: int, data_len: int = 32, kvs: list[bytes] | None = None
    ) -> set[str]:
        blob = _raw(kvs or [], n, infos)
        blob += b"\0" * (-len(blob) % 32) + b"\0" * data_len
        return set(_rules(blob))

    assert "TG911" in rules_for(_info("w", [8], 0, 64), 1)  # ends past the file
    assert "TG911" in rules_for(_info("w", [8], 0, 4), 1)  # misaligned
    assert "TG911" in rules_for(_info("w", [1, 1, 1, 1, 8], 0, 0), 1)  # five dimensions
    assert "TG911" in rules_for(_info("w", [-8], 0, 0), 1)  # negative dimension
    assert "TG911" in rules_for(_info("w", [2**40, 2**40], 0, 0), 1)  # overflows int64
    assert "TG911" in rules_for(_info("w", [33], 2, 0), 1)  # Q4_0 rows of 33 elements
    assert "TG911" in rules_for(_info("x" * 64, [8], 0, 0), 1)  # name too long for ggml
    assert "TG913" in rules_for(_info("w", [8], 99, 0), 1)  # type unknown to trainguard
    assert "TG913" in rules_for(_info("w", [8], 0, 0), 1, data_len=96)  # trailing bytes
    gap = _info("a", [8], 0, 64) + _info("b", [8], 0, 0)  # out of order, no overlap
    assert rules_for(gap, 2, data_len=96) == {"TG913"}
    bad_align = [_kv("general.alignment", 4, struct.pack("<I", 24))]
    assert "TG911" in rules_for(_info("w", [8], 0, 0), 1, kvs=bad_align)
    wrong_type = [_kv("general.alignment", 10, struct.pack("<Q", 32))]
    assert "TG911" in rules_for(_info("w", [8], 0, 0), 1, kvs=wrong_type)


def test_value_table_violations_and_caps() -> None:
    assert _rules(_raw([_kv("", 4, struct.pack("<I", 1))])) == {"TG911": Severity.HIGH}
    assert _rules(_raw([_kv("k", 13, b"")])) == {"TG911": Severity.HIGH}  # unknown type
    huge_string = _kv("k", 8, struct.pack("<Q", 2**40))
    assert _rules(_raw([huge_string])) == {"TG002": Severity.HIGH}
    short_string = _kv("k", 8, struct.pack("<Q", 1000) + b"abc")
    assert _rules(_raw([short_string])) == {"TG911": Severity.HIGH}
    huge_array = _kv("k", 9, struct.pack("<IQ", 0, 2**50))
    assert _rules(_raw([huge_array])) == {"TG002": Severity.HIGH}
    nested = _kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 1) + b"\1\0\0\0")
    assert _rules(_raw([nested])) == {"TG913": Severity.LOW}
    deep = struct.pack("<IQ", 9, 1) * 10 + struct.pack("<IQ", 4, 0)
    assert "TG002" in _rules(_raw([_kv("k", 9, deep)]))
    too_many = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0)
    assert _rules(too_many) == {"TG002": Severity.HIGH}
    small = Limits(max_gguf_metadata=200)
    vocab = _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 50) + b"\1\0\0\0\0\0\0\0x" * 50)
    assert _rules(_raw([vocab]), small) == {"TG002": Severity.HIGH}


def test_code_like_metadata_is_medium() -> None:
    rules = _rules(_model(**{"general.description": "run __import__('os').system('id')"}))
    assert rules == {"TG914": Severity.MEDIUM}
    rules = _rules(_model(**{"general.description": "A 7B model fine-tuned with python."}))
    assert rules == {}


def test_template_findings_carry_key_and_offset(tmp_path: Path) -> None:
    data = _model(**{"tokenizer.chat_template.rag": sglang_ssti("true")})
    result = scan_bytes(data, "t.gguf")
    crit = [f for f in result.findings if f.severity == Severity.CRITICAL]
    assert crit and all(f.trigger == "tokenizer.chat_template.rag" for f in crit)
    offset = crit[0].offset
    assert offset is not None and data[offset + 8 : offset + 20].startswith(b"The answer")


_GGUF_SAMPLES = [s for s in MALICIOUS.values() if s.id.startswith(("gguf-", "tokenizer-config"))]


@pytest.mark.parametrize("sample", [s for s in _GGUF_SAMPLES if s.fires], ids=lambda s: s.id)
def test_sample_fires_under_its_loader(sample: object, tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    canary = tmp_path / "canary"
    path = sample.build(tmp_path, canary)  # type: ignore[attr-defined]
    assert not canary.exists()
    subprocess.run(
        [sys.executable, "-c", LOADERS[sample.loader], str(path)],  # type: ignore[attr-defined]
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 5
    while not canary.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert canary.exists()


_WATCHER = textwrap.dedent(
    """
    import sys, trainguard, trainguard.scanner.engine, trainguard.render
    import trainguard.render.text, trainguard.render.jsonfmt, trainguard.render.sarif
    # The scanner imports its own format modules, by fixed names, on first use:
    # load them all first so that any import seen below is one the data caused.
    from trainguard.scanner import registry; registry.preload()
    events = []
    watching = False
    BAD = ("import", "exec", "compile", "subprocess.Popen", "os.system", "os.posix_spawn",
           "os.spawn", "socket.connect", "pickle.find_class", "marshal.loads")
    def hook(event, args):
        if watching and event.startswith(BAD):
            events.append((event, repr(args)[:200]))
    sys.addaudithook(hook)
    watching = True
    report = trainguard.scan(sys.argv[1:])
    watching = False
    assert report.verdict is not None and report.verdict.name == "CRITICAL", report.verdict
    print("EVENTS", events)
    sys.exit(1 if events else 0)
    """
)


def test_scanning_templates_imports_and_runs_nothing(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    canary = tmp_path / "canary"
    for sample in _GGUF_SAMPLES:
        folder = tmp_path / sample.id
        folder.mkdir()
        sample.build(folder, canary)
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not canary.exists()


# -- fuzz -------------------------------------------------------------------------------------

_VALID = _model(**{"tokenizer.ggml.tokens": ["a", "b", "c"], "general.alignment": 32})


@settings(
    max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=8))
def test_fuzz_mutated_file(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    result = scan_bytes(bytes(data), "f.gguf")
    assert result.error is None, result.error


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_tables(body: bytes) -> None:
    result = scan_bytes(b"GGUF\x03\0\0\0" + body, "f.gguf")
    assert result.error is None, result.error


def test_time_limit_stops_a_long_table() -> None:
    tokens = [f"t{i}" for i in range(20_000)]
    data = gguf_bytes({"tokenizer.ggml.tokens": tokens})
    assert _rules(data, Limits(max_seconds_per_file=0.0)) == {"TG002": Severity.HIGH}
    assert _rules(data) == {}
