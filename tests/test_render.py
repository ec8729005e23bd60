"""The three report formats, fed hand-built reports (no scanner involved)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.render import FORMATS, render
from trainguard.render.jsonfmt import SCHEMA_VERSION, render_json
from trainguard.render.sarif import (
    FINGERPRINT_KEY,
    SARIF_SCHEMA_URI,
    artifact_uri,
    render_sarif,
    sarif_dict,
)
from trainguard.render.text import INFO_LISTED_MAX, WIDTH, printable, render_text
from trainguard.rules import RULES

SCHEMA_PATH = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
ANSI = re.compile(r"\x1b\[")
C, H, M, L, INFO = (
    Severity.CRITICAL,
    Severity.HIGH,
    Severity.MEDIUM,
    Severity.LOW,
    Severity.INFO,
)


def finding(
    rule: str,
    severity: Severity,
    file: str,
    *,
    member: str = "",
    offset: int | None = None,
    trigger: str = "",
    message: str = "",
    evidence: dict[str, str] | None = None,
) -> Finding:
    return Finding(
        rule=rule,
        severity=severity,
        message=message or f"{RULES[rule].title if rule in RULES else rule} seen",
        file=file,
        member=member,
        offset=offset,
        trigger=trigger,
        evidence=evidence or {},
    )


def mixed_report() -> ScanReport:
    """Two critical, one high, one medium, an errored file and clean files."""
    evil = "models/evil.pt"
    legacy = "models/legacy.bin"
    return ScanReport(
        files=[
            FileResult(
                evil,
                "pytorch-zip",
                123_456,
                [
                    finding(
                        "TG101",
                        C,
                        evil,
                        member="archive/data.pkl",
                        offset=57,
                        trigger="os.system",
                        message="imports os.system, which runs a shell command",
                        evidence={"name": "system", "module": "os"},
                    ),
                    finding("TG201", M, evil, member="archive/data/0", message="bad CRC"),
                ],
            ),
            FileResult("models/clean.safetensors", "safetensors", 4096),
            FileResult(
                legacy,
                "pickle",
                900,
                [
                    finding(
                        "TG104",
                        C,
                        legacy,
                        offset=12,
                        trigger="builtins.getattr",
                        message="calls the result of a call",
                    ),
                    finding("TG102", H, legacy, offset=3, trigger="uuid._get_command_stdout"),
                ],
                error="stream truncated at byte 900",
            ),
            FileResult("models/weights.npy", "numpy", 800),
        ],
    )


def clean_report() -> ScanReport:
    return ScanReport(
        files=[FileResult("a.safetensors", "safetensors", 10), FileResult("b.npy", "numpy", 20)]
    )


def info_report(count: int) -> ScanReport:
    files = [
        FileResult(
            f"tok/vocab{i}.txt", "unknown", 10, [finding("TG001", INFO, f"tok/vocab{i}.txt")]
        )
        for i in range(count)
    ]
    return ScanReport(files=files)


# -- dispatch ------------------------------------------------------------------


def test_formats_and_dispatch() -> None:
    assert FORMATS == ("text", "json", "sarif")
    report = mixed_report()
    assert render(report, "text") == render_text(report)
    assert render(report, "json", tool_version="1.2.3") == render_json(report, tool_version="1.2.3")
    for fmt in FORMATS:
        assert render(report, fmt)  # the default version is looked up, never a crash
    with pytest.raises(ValueError, match="text, json, sarif"):
        render(report, "html")


def test_every_kind_and_format_resolves() -> None:
    """Each entry of the one table names a function that exists (they load lazily)."""
    from trainguard.render import _RENDERERS, KINDS, formats, kind_of, renderer

    assert {kind for kind, _ in _RENDERERS} == set(KINDS.values())
    for kind, fmt in _RENDERERS:
        assert fmt in formats(kind)
        assert callable(renderer(kind, fmt))
    with pytest.raises(ValueError, match="not a trainguard report"):
        kind_of(object())
    with pytest.raises(ValueError, match="unknown diff report format 'sarif'"):
        renderer("diff", "sarif")


def test_one_dispatcher() -> None:
    """Formats are picked in one place: no renderer module has a render(report, fmt) of its own."""
    import ast

    folder = Path(__file__).parent.parent / "src" / "trainguard" / "render"
    own = [
        f"{path.name}:{node.name}"
        for path in sorted(folder.glob("*.py"))
        if path.name != "__init__.py"
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.FunctionDef) and node.name == "render"
    ]
    assert own == []


def test_a_subclass_of_a_report_renders_as_its_base() -> None:
    class Mine(ScanReport):
        pass

    report = Mine(files=mixed_report().files)
    assert render(report, "json", tool_version="x") == render_json(report, tool_version="x")


# -- text ----------------------------------------------------------------------


def test_text_lists_findings_and_only_counts_clean_files() -> None:
    out = render_text(mixed_report())
    lines = out.splitlines()
    assert lines[0].startswith("models/evil.pt  pytorch-zip, 123,456 bytes")
    assert "clean.safetensors" not in out
    assert "weights.npy" not in out
    row = next(line for line in lines if "TG101" in line)
    assert re.match(r"\s+critical\s+TG101\s+models/evil\.pt!archive/data\.pkl@57\s+imports", row)
    # The trigger is named in the message, so it is not repeated...
    assert row.count("os.system") == 1
    # ...but it is added where the message does not name it.
    assert "[uuid._get_command_stdout]" in out
    assert "models/legacy.bin@12" in out
    assert "scan incomplete: stream truncated at byte 900" in out


def test_text_orders_findings_by_severity_within_a_file() -> None:
    out = render_text(mixed_report())
    assert out.index("TG104") < out.index("TG102")
    assert out.index("TG101") < out.index("TG201")


def test_text_summary_and_fail_verdict() -> None:
    lines = render_text(mixed_report()).splitlines()
    assert lines[-2] == "4 files scanned: 2 critical, 1 high, 1 medium; 1 error (scan incomplete)"
    assert lines[-1] == "FAIL: 2 critical, 1 high (failing at >= high)"


def test_text_clean_report_is_two_lines() -> None:
    assert render_text(clean_report()) == (
        "2 files scanned: no findings\nOK: no findings at or above high\n"
    )


def test_clean_text_without_rich_matches_rich() -> None:
    """A clean report skips rich; what it prints is what rich would have printed."""
    from trainguard.render import text

    for report in (clean_report(), ScanReport(files=[FileResult("a", "pickle", 1)])):
        lines = [text._summary(report), text._verdict(report)]
        assert text.render_text(report) == text._render_rich(report, lines, color=False)


def test_scan_cli_start_up_imports_only_what_a_scan_needs(tmp_path: Path) -> None:
    """`trainguard scan` of a clean pickle loads neither rich, jinja2 nor the other pillars."""
    import pickle
    import subprocess
    import sys

    (tmp_path / "clean.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    probe = (
        "import sys; from trainguard.cli.main import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'rich', 'jinja2', 'torch', 'cryptography', 'importlib_metadata'} "
        "or m.startswith(('trainguard.loader', 'trainguard.signing', 'trainguard.monitor', "
        "'trainguard.ledger', 'trainguard.explain', 'trainguard.scanner.hub', "
        "'importlib.metadata', 'trainguard.render.sarif')))); sys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, "scan", str(tmp_path / "clean.pkl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert "OK: no findings" in proc.stdout


def test_text_findings_below_threshold_are_ok() -> None:
    report = ScanReport(
        files=[FileResult("a.pkl", "pickle", 5, [finding("TG103", M, "a.pkl", offset=1)])],
        fail_on=C,
    )
    assert render_text(report).splitlines()[-1] == "OK: no findings at or above critical"


def test_text_error_without_failing_finding_is_incomplete() -> None:
    report = ScanReport(files=[FileResult("a.pkl", "pickle", 5, error="read failed")])
    out = render_text(report)
    assert "a.pkl  pickle, 5 bytes" in out
    assert "scan incomplete: read failed" in out
    assert out.splitlines()[-1].startswith("INCOMPLETE: 1 file could not be scanned")


def test_text_lists_a_few_info_findings() -> None:
    out = render_text(info_report(INFO_LISTED_MAX))
    assert out.count("TG001") == INFO_LISTED_MAX
    assert "not listed" not in out


def test_text_groups_many_info_findings() -> None:
    out = render_text(info_report(INFO_LISTED_MAX + 5))
    assert "vocab" not in out
    assert f"{INFO_LISTED_MAX + 5} info findings not listed (TG001 unknown-format: 8)" in out
    assert out.splitlines()[-1] == "OK: no findings at or above high"


def test_text_grouped_infos_keep_other_findings_of_their_file() -> None:
    report = info_report(INFO_LISTED_MAX + 1)
    report.files[0].findings.append(finding("TG108", L, "tok/vocab0.txt", offset=9))
    out = render_text(report)
    assert "TG108" in out
    assert "tok/vocab0.txt@9" in out
    assert "TG001 tok" not in out


def test_text_color_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment must not decide: the caller (the CLI) does.
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "20")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    plain = render_text(mixed_report())
    assert not ANSI.search(plain)
    colored = render_text(mixed_report(), color=True)
    assert ANSI.search(colored)
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


def test_text_lines_fit_and_have_no_trailing_blanks() -> None:
    report = mixed_report()
    report.files[0].findings.append(
        finding("TG103", M, "models/evil.pt", message="word " * 60, trigger="x.y")
    )
    for line in render_text(report).splitlines():
        assert len(line) <= WIDTH
        assert line == line.rstrip()


def test_text_escapes_hostile_names() -> None:
    hostile = "evil\x1b[2J\x1b[1A\r\nFAKE OK\u202egnp.pkl"
    report = ScanReport(
        files=[
            FileResult(
                "dir/\udcffname.pkl",
                "pickle",
                1,
                [
                    finding(
                        "TG101",
                        C,
                        "dir/\udcffname.pkl",
                        member=hostile,
                        trigger="[bold]os.system[/bold]",
                        message="imports [red]x[/red]",
                    )
                ],
            )
        ]
    )
    for color in (False, True):
        out = render_text(report, color=color)
        assert "\r" not in out
        assert "\u202e" not in out
        assert "\udcff" not in out
        assert "\x1b[2J" not in out
        assert "\x1b[1A" not in out
        assert "\\x1b[2J\\x1b[1A\\x0d\\x0aFAKE OK\\u202egnp.pkl" in out
        assert "dir/\\xffname.pkl" in out
        # Rich markup in a name is text, not styling.
        assert "[bold]os.system[/bold]" in out
        assert "[red]x[/red]" in out


def test_printable() -> None:
    assert printable("torch._utils._rebuild_tensor_v2") == "torch._utils._rebuild_tensor_v2"
    assert printable("naïve 模型 name") == "naïve 模型 name"
    assert printable("a\tb\x00c\x7f") == "a\\x09b\\x00c\\x7f"
    assert printable("\u2028\u200b\U000e0001") == "\\u2028\\u200b\\U000e0001"
    assert printable("\udc80") == "\\x80"


# -- json ----------------------------------------------------------------------


def test_json_is_one_document_with_stable_keys() -> None:
    doc = json.loads(render_json(mixed_report(), tool_version="0.3.0"))
    assert list(doc) == [
        "tool",
        "version",
        "schema",
        "fail_on",
        "verdict",
        "exit_code",
        "files",
        "summary",
    ]
    assert doc["tool"] == "trainguard"
    assert doc["version"] == "0.3.0"
    assert doc["schema"] == SCHEMA_VERSION == 1
    assert doc["fail_on"] == "high"
    assert doc["verdict"] == "critical"
    assert doc["exit_code"] == 1
    assert list(doc["files"][0]) == ["path", "format", "size", "verdict", "error", "findings"]
    assert list(doc["files"][0]["findings"][0]) == [
        "rule",
        "name",
        "severity",
        "message",
        "file",
        "member",
        "offset",
        "trigger",
        "evidence",
    ]
    assert doc["summary"] == {
        "files": 4,
        "errors": 1,
        "findings": 4,
        "by_severity": {"critical": 2, "high": 1, "medium": 1, "low": 0, "info": 0},
    }
    assert list(doc["summary"]["by_severity"]) == ["critical", "high", "medium", "low", "info"]


def test_json_round_trips_every_field() -> None:
    report = mixed_report()
    doc = json.loads(render_json(report, tool_version="x"))
    for result, entry in zip(report.files, doc["files"], strict=True):
        assert entry["path"] == result.path
        assert entry["format"] == result.format
        assert entry["size"] == result.size
        assert entry["error"] == result.error
        assert entry["verdict"] == (None if result.verdict is None else str(result.verdict))
        rebuilt = [
            Finding(
                rule=f["rule"],
                severity=Severity.parse(f["severity"]),
                message=f["message"],
                file=f["file"],
                member=f["member"],
                offset=f["offset"],
                trigger=f["trigger"],
                evidence=f["evidence"],
            )
            for f in entry["findings"]
        ]
        assert rebuilt == result.findings
        for f in entry["findings"]:
            assert f["name"] == RULES[f["rule"]].title
    evidence = doc["files"][0]["findings"][0]["evidence"]
    assert list(evidence) == ["module", "name"]


def test_json_clean_report() -> None:
    doc = json.loads(render_json(clean_report(), tool_version="x"))
    assert doc["verdict"] is None
    assert doc["exit_code"] == 0
    assert all(f["verdict"] is None and f["findings"] == [] for f in doc["files"])


def test_json_incomplete_scan_exit_code() -> None:
    report = ScanReport(files=[FileResult("a.pkl", "pickle", 5, error="read failed")])
    doc = json.loads(render_json(report, tool_version="x"))
    assert doc["exit_code"] == 2
    assert doc["files"][0]["error"] == "read failed"


def test_json_is_ascii_and_keeps_undecodable_names() -> None:
    path = "mod\u00e8les/\udcff\u202e.pkl"
    report = ScanReport(
        files=[FileResult(path, "pickle", 1, [Finding("TG999", H, "policy rule", member="m")])]
    )
    out = render_json(report, tool_version="x")
    assert out.isascii()
    entry = json.loads(out)["files"][0]
    assert entry["path"] == path
    # An empty finding.file means "the file being reported on".
    assert entry["findings"][0]["file"] == path
    assert entry["findings"][0]["name"] == ""


# -- sarif ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sarif_validator() -> Any:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def sarif(report: ScanReport, root: str | None = None) -> dict[str, Any]:
    # root None: the working directory, against which the reports' relative paths resolve.
    out = render_sarif(report, tool_version="0.3.0", root=root)
    assert out.isascii()
    doc: dict[str, Any] = json.loads(out)
    return doc


def sample_reports() -> list[ScanReport]:
    unknown_rule = ScanReport(
        files=[FileResult("x.pkl", "pickle", 1, [finding("TG999", L, "x.pkl", message="custom")])]
    )
    return [mixed_report(), clean_report(), info_report(5), unknown_rule]


def test_vendored_schema_is_the_oasis_one() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["id"] == SARIF_SCHEMA_URI
    assert schema["title"] == "Static Analysis Results Format (SARIF) Version 2.1.0 JSON Schema"


@pytest.mark.parametrize("index", range(len(sample_reports())))
def test_sarif_validates_against_schema(sarif_validator: Any, index: int) -> None:
    doc = sarif(sample_reports()[index])
    errors = sorted(sarif_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert doc["$schema"] == SARIF_SCHEMA_URI
    assert doc["version"] == "2.1.0"
    assert len(doc["runs"]) == 1


def test_sarif_schema_rejects_a_broken_log(sarif_validator: Any) -> None:
    # Guards the guard: the validator really checks something.
    doc = sarif(mixed_report())
    doc["runs"][0]["results"][0]["level"] = "critical"
    assert not sarif_validator.is_valid(doc)


def test_sarif_rules_follow_github_conventions() -> None:
    driver = sarif(mixed_report())["runs"][0]["tool"]["driver"]
    assert driver["name"] == "trainguard"
    assert driver["version"] == "0.3.0"
    assert driver["informationUri"].startswith("https://")
    rules = {r["id"]: r for r in driver["rules"]}
    assert list(rules)[: len(RULES)] == list(RULES)
    for rule_id, known in RULES.items():
        descriptor = rules[rule_id]
        assert descriptor["name"] == known.title
        assert descriptor["fullDescription"]["text"] == descriptor["help"]["text"] == known.help
        assert known.help.startswith(descriptor["shortDescription"]["text"])
        assert descriptor["shortDescription"]["text"].endswith(".")
        score = descriptor["properties"]["security-severity"]
        assert isinstance(score, str)
        assert 0.0 <= float(score) <= 10.0
        assert descriptor["properties"]["tags"] == ["security"]
    expected = {
        "TG101": ("9.5", "error"),
        "TG102": ("8.0", "error"),
        "TG103": ("5.5", "warning"),
        "TG108": ("3.0", "note"),
        "TG001": ("0.0", "note"),
    }
    for rule_id, (score, level) in expected.items():
        assert rules[rule_id]["properties"]["security-severity"] == score
        assert rules[rule_id]["defaultConfiguration"]["level"] == level


def test_sarif_results() -> None:
    run = sarif(mixed_report())["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    results = run["results"]
    assert [r["ruleId"] for r in results] == ["TG101", "TG201", "TG104", "TG102"]
    assert [r["level"] for r in results] == ["error", "warning", "error", "error"]
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["message"]["text"]
        (location,) = result["locations"]
        assert location["physicalLocation"]["region"]["startLine"] == 1

    in_member, _, plain, _ = results
    # A member's offset is not a file offset: it stays out of the region.
    assert "byteOffset" not in in_member["locations"][0]["physicalLocation"]["region"]
    assert in_member["locations"][0]["logicalLocations"] == [
        {"fullyQualifiedName": "archive/data.pkl"}
    ]
    assert in_member["properties"] == {
        "severity": "critical",
        "member": "archive/data.pkl",
        "offset": 57,
        "trigger": "os.system",
        "evidence": {"module": "os", "name": "system"},
    }
    assert "archive/data.pkl@57" in in_member["message"]["text"]
    assert plain["locations"][0]["physicalLocation"]["region"] == {"startLine": 1, "byteOffset": 12}
    assert "logicalLocations" not in plain["locations"][0]
    assert "(trigger: builtins.getattr)" in plain["message"]["text"]


def test_sarif_uris_are_relative_and_escaped() -> None:
    name = "my models/a#b%c\\d/\u00e9\udcff.pkl"
    report = ScanReport(files=[FileResult(name, "pickle", 1, [finding("TG104", C, name)])])
    uri = sarif(report)["runs"][0]["results"][0]["locations"][0]["physicalLocation"][
        "artifactLocation"
    ]["uri"]
    assert uri == "my%20models/a%23b%25c%5Cd/%C3%A9%FF.pkl"
    assert ":" not in uri
    assert not uri.startswith("/")


def test_artifact_uri_normalises_lexically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    monkeypatch.chdir(repo)
    assert artifact_uri("./models/a.pt", ".") == "models/a.pt"
    assert artifact_uri("models/../b.pt", str(repo)) == "b.pt"
    assert artifact_uri(str(repo / "models/a.pt"), ".") == "models/a.pt"
    assert artifact_uri("sub/a.pt", "sub") == "a.pt"
    assert artifact_uri("/repo/models/a.pt", "/repo/") == "models/a.pt"
    # Outside the root: an absolute file URI, never a path that climbs with "..".
    assert artifact_uri("../a.pt", ".") == (tmp_path / "a.pt").as_uri()
    assert artifact_uri("/elsewhere/a b.pt", "/repo") == "file:///elsewhere/a%20b.pt"


def test_sarif_fingerprints_are_stable_and_distinct() -> None:
    def prints(report: ScanReport, root: str | None) -> list[str]:
        results = sarif(report, root)["runs"][0]["results"]
        return [r["partialFingerprints"][FINGERPRINT_KEY] for r in results]

    first = prints(mixed_report(), None)
    assert first == prints(mixed_report(), None)
    # The same checkout scanned by absolute path, elsewhere on disk.
    absolute = mixed_report()
    for result in absolute.files:
        result.path = f"/ci/work/{result.path}"
        result.findings = [f.located(f"/ci/work/{f.file}") for f in result.findings]
    assert prints(absolute, "/ci/work") == first
    assert len(set(first)) == len(first)
    assert all(re.fullmatch(r"[0-9a-f]{64}", p) for p in first)


def test_sarif_errors_are_notifications() -> None:
    invocation = sarif(mixed_report())["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert invocation["exitCode"] == 1
    (note,) = invocation["toolExecutionNotifications"]
    assert note["level"] == "error"
    assert note["message"]["text"] == "scan incomplete: stream truncated at byte 900"
    uri = note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "models/legacy.bin"

    clean = sarif(clean_report())["runs"][0]
    assert clean["results"] == []
    assert clean["invocations"][0]["executionSuccessful"] is True
    assert clean["invocations"][0]["toolExecutionNotifications"] == []


def test_sarif_scores_a_re_rated_rule_at_its_reported_severity() -> None:
    # A policy raised TG103 (default medium) to critical.
    report = ScanReport(files=[FileResult("a.pkl", "pickle", 1, [finding("TG103", C, "a.pkl")])])
    run = sarif(report)["runs"][0]
    (result,) = run["results"]
    rule = run["tool"]["driver"]["rules"][result["ruleIndex"]]
    assert rule["properties"]["security-severity"] == "9.5"
    assert rule["defaultConfiguration"]["level"] == "warning"
    assert result["level"] == "error"


def test_sarif_describes_an_unregistered_rule() -> None:
    report = sample_reports()[-1]
    run = sarif(report)["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert len(rules) == len(RULES) + 1
    (result,) = run["results"]
    assert result["ruleIndex"] == len(RULES)
    assert rules[-1]["id"] == "TG999"
    assert rules[-1]["properties"]["security-severity"] == "3.0"


def test_sarif_default_root_is_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "m" / "a.pkl")
    report = ScanReport(files=[FileResult(path, "pickle", 1, [finding("TG104", C, path)])])
    doc = sarif_dict(report, tool_version="x")
    runs: Any = doc["runs"]
    uri = runs[0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "m/a.pkl"


def test_every_replay_field_has_its_words() -> None:
    """explain/replay names the fields (data); render/replay words them, each one."""
    from trainguard.explain.replay.result import FIELD_ORDER
    from trainguard.render.replay import FIELD_TEXT

    assert set(FIELD_TEXT) == set(FIELD_ORDER)
