"""Whole model repositories: auto_map, custom pipelines, *.py files, bounded configs.

The repository samples (``trainguard.samples.fmt_repo``) are only ever loaded by
transformers in a subprocess, which proves the malicious ones really run code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainguard import Severity, scan
from trainguard.findings import FileResult
from trainguard.limits import Limits
from trainguard.render import render
from trainguard.samples.fmt_repo import REPO_LOADERS, REPOSITORIES, RepoSample
from trainguard.scanner import Policy
from trainguard.scanner.repository import looks_like_repository, parse_reference

_LEVEL = {"clean": None, "low": Severity.LOW, "medium": Severity.MEDIUM, "high": Severity.HIGH}
_MALICIOUS = [s for s in REPOSITORIES.values() if s.malicious]
_BENIGN = [s for s in REPOSITORIES.values() if not s.malicious]


def _build(sample: RepoSample, tmp_path: Path) -> Path:
    folder = tmp_path / sample.id
    folder.mkdir()
    return sample.build(folder, tmp_path / "canary")


def _by_file(results: list[FileResult], name: str) -> list[tuple[str, Severity]]:
    """(rule, severity) of the findings on files called ``name``."""
    return [(f.rule, f.severity) for r in results if Path(r.path).name == name for f in r.findings]


@pytest.mark.parametrize("sample", _MALICIOUS, ids=[s.id for s in _MALICIOUS])
def test_malicious_repository_is_high(sample: RepoSample, tmp_path: Path) -> None:
    report = scan([_build(sample, tmp_path)])
    summary = [(f.rule, str(f.severity), f.file) for f in report.findings]
    assert report.verdict is not None and report.verdict >= Severity.HIGH, summary
    assert report.exit_code() == 1
    assert not (tmp_path / "canary").exists()


@pytest.mark.parametrize("sample", _BENIGN, ids=[s.id for s in _BENIGN])
def test_benign_repository_stays_quiet(sample: RepoSample, tmp_path: Path) -> None:
    report = scan([_build(sample, tmp_path)])
    assert report.errors == []
    allowed = _LEVEL[sample.expect] or Severity.INFO
    summary = [(f.rule, str(f.severity), f.message) for f in report.findings]
    assert report.verdict is None or report.verdict <= allowed, summary
    # config.json was read and understood: no "format not recognised" for it.
    assert _by_file(report.files, "config.json") == []


def test_auto_map_names_modules_and_classes(tmp_path: Path) -> None:
    report = scan([_build(REPOSITORIES["repo-auto-map-modeling"], tmp_path)])
    (config,) = [f for f in report.findings if f.rule == "TG1401"]
    assert Path(config.file).name == "config.json"
    assert "modeling_evil.py" in config.message and "EvilModel" in config.message
    assert "configuration_evil.py" in config.message and "in this repository" in config.message
    assert config.evidence["modules"] == "configuration_evil.py, modeling_evil.py"
    modeling = _by_file(report.files, "modeling_evil.py")
    assert ("TG1402", Severity.HIGH) in modeling and ("TG1405", Severity.HIGH) in modeling
    assert ("TG1402", Severity.HIGH) in _by_file(report.files, "configuration_evil.py")
    # Every file is still scanned by content, and the .py files are labelled as code.
    formats = {Path(r.path).name: r.format for r in report.files}
    assert formats["model.safetensors"] == "safetensors"
    assert formats["modeling_evil.py"] == "python"


def test_payload_in_a_relative_import_is_found(tmp_path: Path) -> None:
    report = scan([_build(REPOSITORIES["repo-payload-in-helper"], tmp_path)])
    helper = _by_file(report.files, "rotary_helpers.py")
    assert ("TG1403", Severity.MEDIUM) in helper and ("TG1405", Severity.HIGH) in helper
    (finding,) = [f for r in report.files for f in r.findings if f.rule == "TG1405"]
    assert "os.system" in finding.message and "line 2" in finding.message


def test_tokenizer_and_pipeline_and_other_repository(tmp_path: Path) -> None:
    tok = scan([_build(REPOSITORIES["repo-tokenizer-auto-map"], tmp_path)])
    assert ("TG1401", Severity.HIGH) in _by_file(tok.files, "tokenizer_config.json")
    assert ("TG1402", Severity.HIGH) in _by_file(tok.files, "tokenization_evil.py")
    pipe = scan([_build(REPOSITORIES["repo-custom-pipeline"], tmp_path)])
    (cfg,) = [f for f in pipe.findings if f.rule == "TG1401"]
    assert "custom_pipelines evil-task" in cfg.message and "pipeline_evil.py" in cfg.message
    other = scan([_build(REPOSITORIES["repo-code-from-other-repo"], tmp_path)])
    (cfg,) = [f for f in other.findings if f.rule == "TG1401"]
    assert "attacker/helpers" in cfg.message and "not scanned here" in cfg.message


def test_unreferenced_python_file_is_low(tmp_path: Path) -> None:
    report = scan([_build(REPOSITORIES["repo-benign-with-script"], tmp_path)])
    assert _by_file(report.files, "convert_checkpoint.py") == [("TG1404", Severity.LOW)]
    quiet = scan([tmp_path], policy=Policy(ignore=frozenset({"TG1404"})))
    assert _by_file(quiet.files, "convert_checkpoint.py") == []


def test_a_folder_of_code_is_not_a_model_repository(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("import os\nos.system('ls')\n")
    (tmp_path / "config.json").write_text('{"batch_size": 8}')
    assert not looks_like_repository(tmp_path, ["train.py", "config.json"])
    assert [f.rule for f in scan([tmp_path]).findings] == ["TG001", "TG001"]


def test_trust_remote_code_key_and_duplicate_auto_map(tmp_path: Path) -> None:
    # Python's json keeps the last duplicate; every one is reported.
    (tmp_path / "config.json").write_text(
        '{"model_type": "x", "auto_map": {"AutoModel": "a.A"}, "auto_map": {"AutoModel": "b.B"},'
        ' "text_config": {"trust_remote_code": true}}'
    )
    (finding,) = scan([tmp_path]).findings
    assert finding.rule == "TG1401"
    assert "a.py" in finding.message and "b.py" in finding.message
    assert "missing from this folder" in finding.message
    assert finding.evidence["trust_remote_code"] == "true"


def test_config_reads_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"model_type": "x", "pad": "y" * 400}))
    report = scan([big], limits=Limits(max_model_config=200))
    assert [(f.rule, f.severity) for f in report.findings] == [("TG002", Severity.HIGH)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text('{"auto_map": ' + "[" * 100_000)
    (bad / "model.safetensors").write_bytes(b"")
    rules = [f.rule for f in scan([bad]).findings if Path(f.file).name == "tokenizer_config.json"]
    assert "TG003" in rules


def test_relative_imports_stay_inside_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.py").write_text("x = 1\n")
    (repo / "config.json").write_text('{"auto_map": {"AutoModel": "m.M"}}')
    (repo / "m.py").write_text("from .. import outside\nfrom .sub.helper import h\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "helper.py").write_text("def h():\n    return 1\n")
    report = scan([repo])
    assert _by_file(report.files, "helper.py") == [("TG1403", Severity.MEDIUM)]
    assert _by_file(report.files, "outside.py") == []


def test_reference_parsing() -> None:
    ref = parse_reference("auto_map AutoModel", "org/name--modeling_x.XModel")
    assert (ref.repo, ref.module, ref.cls, ref.module_file) == (
        "org/name",
        "modeling_x",
        "XModel",
        "modeling_x.py",
    )
    assert parse_reference("w", "mod.Cls").repo == ""


def test_json_report_locates_repository_findings(tmp_path: Path) -> None:
    folder = _build(REPOSITORIES["repo-auto-map-modeling"], tmp_path)
    doc = json.loads(render(scan([folder]), "json", tool_version="0"))
    located = {(Path(f["file"]).name, f["rule"]) for r in doc["files"] for f in r["findings"]}
    assert {("config.json", "TG1401"), ("modeling_evil.py", "TG1402")} <= located


_WATCHER = textwrap.dedent(
    """
    import sys, trainguard, trainguard.scanner.engine, trainguard.render
    import trainguard.render.text, trainguard.render.jsonfmt, trainguard.render.sarif
    # The scanner imports its own format modules, by fixed names, on first use:
    # load them all first so that any import seen below is one the data caused.
    from trainguard.scanner import registry; registry.preload()
    events = []
    watching = False
    BAD = ("import", "exec", "compile", "subprocess.Popen", "os.system", "os.exec",
           "os.posix_spawn", "os.spawn", "socket.connect", "marshal.loads")
    def hook(event, args):
        if watching and event.startswith(BAD):
            events.append((event, repr(args)[:200]))
    sys.addaudithook(hook)
    watching = True
    report = trainguard.scan(sys.argv[1:])
    watching = False
    assert report.verdict is not None and report.verdict.name == "HIGH", report.verdict
    print("EVENTS", events)
    sys.exit(1 if events else 0)
    """
)


def test_scanning_repositories_imports_and_runs_nothing(tmp_path: Path) -> None:
    for sample in _MALICIOUS:
        _build(sample, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "canary").exists()


_HARNESS = textwrap.dedent(
    """
    import json, sys
    jobs = json.loads(sys.argv[1])
    codes = {}
    for sid, src, folder in jobs:
        sys.argv = ["-c", folder]
        try:
            exec(compile(src, "<loader>", "exec"), {"__name__": "__main__"})
            codes[sid] = 0
        except BaseException:
            codes[sid] = 1
    print("CODES", json.dumps(codes))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (test extra)"
)
def test_samples_fire_under_transformers_in_a_subprocess(tmp_path: Path) -> None:
    runnable = [s for s in REPOSITORIES.values() if s.fires or not s.malicious]
    jobs, canaries = [], {}
    for sample in runnable:
        folder = tmp_path / sample.id
        folder.mkdir()
        canaries[sample.id] = tmp_path / f"{sample.id}.canary"
        sample.build(folder, canaries[sample.id])
        jobs.append((sample.id, REPO_LOADERS[sample.loader], str(folder)))
    assert not any(c.exists() for c in canaries.values()), "building must not run a payload"
    proc = subprocess.run(
        [sys.executable, "-c", _HARNESS, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env_without_hf(), "HF_HOME": str(tmp_path / "hf")},
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CODES ")]
    assert line, proc.stderr[-3000:]
    codes = json.loads(line[0][len("CODES ") :])
    for sample in runnable:
        fired = canaries[sample.id].exists()
        assert fired == sample.fires, (sample.id, proc.stderr[-3000:])
        if not sample.malicious:
            assert codes[sample.id] == 0, (sample.id, proc.stderr[-3000:])


def _env_without_hf() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
