"""Units of the environment check: RECORD rows, pyc headers and code comparison,
.pth parsing, allowlists, snapshots signed by hand, and the hashing pool."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_env_support import record_hash
from trainguard.env import digests as env_hash
from trainguard.env.allow import DEFAULTS, apply_allowlist, load_allowlist
from trainguard.env.digests import hash_files
from trainguard.env.pth import executes, read_pth
from trainguard.env.pyc import (
    MATCH,
    MISMATCH,
    UNUSED,
    PycJob,
    check_pyc,
    optimization_of,
    same_code,
    same_const,
    would_load,
)
from trainguard.env.record import parse_hash, parse_record
from trainguard.env.snapshot import (
    PAYLOAD_TYPE,
    encode,
    interpreter_findings,
    make_snapshot,
    read_snapshot,
)
from trainguard.errors import UsageError
from trainguard.findings import Finding, Severity
from trainguard.signing.dsse import sign_envelope
from trainguard.signing.keys import generate_keypair, load_private_key, load_public_key


def test_parse_hash() -> None:
    algorithm, digest = parse_hash(record_hash(b"abc"))
    assert algorithm == "sha256"
    assert digest == hashlib.sha256(b"abc").digest()
    for bad in ("sha256", "nope=abc", "sha256=!!!!", "sha256=YWJj"):
        with pytest.raises(ValueError):
            parse_hash(bad)


def test_parse_record_paths_and_problems(tmp_path: Path) -> None:
    root = str(tmp_path)
    text = (
        f"a/b.py,{record_hash(b'x')},1\n"
        "../../../bin/tool,,\n"
        "./odd//name.py,,\n"
        "x,sha256=zz,1\n"
        "y,,big\n"
    )
    entries, problems = parse_record(text, root, "RECORD")
    paths = [e.path for e in entries]
    assert paths[0] == os.path.join(root, "a", "b.py")
    assert paths[1] == os.path.normpath(os.path.join(root, "../../../bin/tool"))
    assert paths[2] == os.path.join(root, "odd", "name.py")
    assert len(problems) == 2


def test_pth_lines() -> None:
    assert executes("import os")
    assert executes("import\tos")
    assert not executes("importlib")
    assert not executes(" import os")  # site strips nothing before the test


def test_read_pth_handles_bom_and_bad_bytes(tmp_path: Path) -> None:
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"\xef\xbb\xbfimport os\n/some/path\n# c\n\xff\xfe\n")
    parsed = read_pth(str(pth))
    assert parsed.exec_lines == ["import os"]
    assert parsed.path_lines[0] == "/some/path"


def test_optimization_levels() -> None:
    tag = importlib.util.cache_from_source("m.py").split(os.sep)[-1][len("m.") : -len(".pyc")]
    assert optimization_of(f"m.{tag}.pyc") == 0
    assert optimization_of(f"m.{tag}.opt-1.pyc") == 1
    assert optimization_of(f"m.{tag}.opt-2.pyc") == 2
    assert optimization_of("m.cpython-27.pyc") is None
    assert optimization_of("m.py") is None


def _pyc(
    source: Path, code_source: str, *, optimize: int = 0, flags: int = 0, mtime: int | None = None
) -> bytes:
    st = source.stat()
    code = compile(code_source, str(source), "exec", dont_inherit=True, optimize=optimize)
    tail = ((mtime if mtime is not None else int(st.st_mtime)) & 0xFFFFFFFF).to_bytes(4, "little")
    tail += (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    if flags & 1:
        tail = importlib.util.source_hash(source.read_bytes())
    return importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + tail + marshal.dumps(code)


def test_check_pyc_verdicts(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("assert True\ndef f():\n    return 1\n")
    pyc = tmp_path / "m.pyc"
    text = src.read_text()
    pyc.write_bytes(_pyc(src, text))
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == MATCH
    # -O strips asserts: level 1 code is not level 0 code.
    pyc.write_bytes(_pyc(src, text, optimize=1))
    assert check_pyc(PycJob(str(pyc), str(src), 1)).status == MATCH
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == MISMATCH
    # Checked hash-based pyc: loaded only while the source hash matches.
    pyc.write_bytes(_pyc(src, text.replace("1", "2"), flags=0b11))
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == MISMATCH
    src.write_text(text + "# edited\n")
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == UNUSED
    # Wrong magic: the interpreter refuses it.
    pyc.write_bytes(b"\0\0\0\0" + _pyc(src, "x = 1\n")[4:])
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == UNUSED


def test_check_pyc_source_that_does_not_compile(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def (:\n")
    pyc = tmp_path / "m.pyc"
    pyc.write_bytes(_pyc(src, "x = 1\n"))
    verdict = check_pyc(PycJob(str(pyc), str(src), 0))
    assert verdict.status == MISMATCH
    assert "does not compile" in verdict.detail


def test_check_pyc_garbage_payload(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    pyc = tmp_path / "m.pyc"
    pyc.write_bytes(_pyc(src, "x = 1\n")[:16] + b"\xff\x00garbage")
    assert check_pyc(PycJob(str(pyc), str(src), 0)).status == "unreadable"


def test_same_code_ignores_filename_only() -> None:
    source = "y = x in {'a', 'b', 'c'}\nz = (1, 2.0, -0.0)\n"
    a = compile(source, "/a.py", "exec")
    b = compile(source, "/elsewhere/b.py", "exec")
    assert same_code(a, b)
    assert not same_code(a, compile(source.replace("-0.0", "0.0"), "/a.py", "exec"))
    assert not same_code(a, compile(source.replace("(1,", "(True,"), "/a.py", "exec"))
    assert not same_code(a, compile(source.replace("'c'", "'d'"), "/a.py", "exec"))
    assert same_const(frozenset({"a", "b", 1}), frozenset({1, "b", "a"}))
    assert not same_const(frozenset({1}), frozenset({True}))


def test_would_load_timestamp(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    header = _pyc(src, "x = 1\n")[:16]
    assert would_load(header, src.read_bytes(), src.stat())
    os.utime(src, (1, 1))
    assert not would_load(header, src.read_bytes(), src.stat())


def test_allowlist_file_validation(tmp_path: Path) -> None:
    bad = tmp_path / "a.toml"
    for text in (
        '[[allow]]\npath = "x"\n',
        '[[allow]]\nreason = "r"\n',
        "other = 1\n",
        '[[allow]]\npath = "x"\nreason = "r"\nsha256 = "abc"\n',
        '[[allow]]\npath = "x"\nreason = "r"\nseverity = "huge"\n',
        '[[allow]]\npath = "x"\nreason = "r"\nextra = 1\n',
        "not toml [",
    ):
        bad.write_text(text)
        with pytest.raises(UsageError):
            load_allowlist(str(bad))
    with pytest.raises(UsageError):
        load_allowlist(str(tmp_path / "missing.toml"))


def test_default_allowlist_lowers_certifi_to_low() -> None:
    finding = Finding(
        "TG601", Severity.HIGH, "edited", file="/v/lib/python3.11/site-packages/certifi/cacert.pem"
    )
    (lowered,) = apply_allowlist([finding], DEFAULTS)
    assert lowered.severity == Severity.LOW
    assert "certifi" in lowered.evidence["allowed"]
    other = replace(finding, file="/v/lib/python3.11/site-packages/certifi/core.py")
    assert apply_allowlist([other], DEFAULTS)[0].severity == Severity.HIGH


def test_interpreter_change_is_reported(tmp_path: Path) -> None:
    private, public = generate_keypair("ed25519")
    (tmp_path / "k.pem").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    snap = make_snapshot([str(tmp_path)], {})
    forged = replace(snap, interpreter={**snap.interpreter, "version": "3.0.0"})
    envelope = sign_envelope(encode(forged), PAYLOAD_TYPE, load_private_key(tmp_path / "k.pem"))
    (tmp_path / "s.json").write_text(json.dumps(envelope))
    loaded = read_snapshot(str(tmp_path / "s.json"), load_public_key(tmp_path / "k.pub"))
    (finding,) = interpreter_findings(loaded, "s.json")
    assert finding.rule == "TG618"
    assert "3.0.0" in finding.message


def test_hash_files_reports_errors_and_reads_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(env_hash.LARGE_FILE + 12345))
    small = [tmp_path / f"s{i}" for i in range(300)]
    for i, path in enumerate(small):
        path.write_bytes(str(i).encode())
    jobs = [(str(p), frozenset({"sha256", "sha512"})) for p in (big, *small)]
    jobs.append((str(tmp_path / "missing"), frozenset({"sha256"})))
    jobs.append((str(tmp_path), frozenset({"sha256"})))  # a folder
    sizes = {str(big): big.stat().st_size}
    digests, errors = hash_files(jobs, sizes, workers=3)
    assert digests[str(big)].values["sha256"] == hashlib.sha256(big.read_bytes()).digest()
    assert digests[str(small[7])].values["sha512"] == hashlib.sha512(b"7").digest()
    assert set(errors) == {str(tmp_path / "missing"), str(tmp_path)}
    assert "not a regular file" in errors[str(tmp_path)]


UNGUARDED = """
import py_compile, sys
from pathlib import Path
from trainguard.env.pyc import PycJob, check_pycs
folder = Path(sys.argv[1])
jobs = []
for i in range(80):
    src = folder / f"m{i}.py"
    src.write_text(f"X = {i}\\n")
    jobs.append(PycJob(py_compile.compile(str(src), cfile=str(folder / f"m{i}.pyc")), str(src), 0))
print(sorted({v.status for v in check_pycs(jobs, workers=2)}))
"""


def test_pyc_check_falls_back_in_process_when_workers_cannot_start(tmp_path: Path) -> None:
    # A script without `if __name__ == "__main__"`: spawned workers re-run it
    # and die while bootstrapping.  That must not turn into findings.
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    work = tmp_path / "work"
    work.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run(
        [sys.executable, str(script), str(work)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['match']"
