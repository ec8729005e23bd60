"""``trainguard ledger show|verify|runs|sign``: output, formats and exit codes."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import jsonschema
import pytest

from tests.test_ledger_support import tamper
from trainguard.cli.main import main
from trainguard.ledger import open_ledger
from trainguard.signing.keys import write_keypair

SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.db"
    with closing(open_ledger(str(path))) as ledger:
        ledger.append("r1", "run-start", {"world_size": 2, "config": {"lr": 0.1}})
        for step in range(3):
            for rank in (0, 1):
                payload = {
                    "loss": 2.0 / (step + 1),
                    "grad_norm": 0.25 * (rank + 1),
                    "step_time": 0.125,
                    "fingerprint": "ab" * 40,
                }
                ledger.append("r1", "step", payload, step=step, stream=rank)
        ledger.append(
            "r1",
            "alert",
            {"rule": "TG1301", "message": "weights changed outside the optimizer step"},
            step=2,
            stream=1,
        )
        ledger.append("r2", "run-start", {})
    return path


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "k")


def test_runs(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "runs", "--ledger", str(ledger_path)]) == 0
    assert capsys.readouterr().out == "r1\nr2\n"
    assert main(["ledger", "runs", "--ledger", f"sqlite:///{ledger_path}", "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"runs": ["r1", "r2"]}


def test_show_prints_the_timeline_and_marks_alerts(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger", "show", "r1", "--ledger", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("run r1 in ")
    assert "8 records in 3 streams, steps 0..2, 1 alert" in lines[0]
    steps = [line for line in lines if "  step  " in line and "rank" in line]
    assert len(steps) == 6
    assert "loss=2 grad_norm=0.25 step_time=0.125" in steps[0]
    assert "fingerprint" not in out  # long hex strings stay in --format json
    assert "world_size=2" in out and "config" not in out
    marked = [line for line in lines if line.startswith("!")]
    assert len(marked) == 1 and "rule=TG1301" in marked[0]
    assert out.rstrip().endswith(
        "! step 2 rank 1: rule=TG1301 message=weights changed outside the optimizer step"
    )


def test_show_json_and_filters(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ledger", "show", "r1", "--ledger", str(ledger_path), "-f", "json"]
    assert main([*args, "--stream", "1", "--kind", "alert"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in document["records"]] == ["alert"]
    assert document["alerts"][0]["payload"]["rule"] == "TG1301"
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["records"]) == 8
    assert document["records"][1]["payload"]["fingerprint"] == "ab" * 40


def test_verify_exit_codes(
    ledger_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    base = ["ledger", "verify", "r1", "--ledger", str(ledger_path)]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "OK: the chains are intact; UNSIGNED" in out and "TG1210" in out
    # A key but no signed head: nothing can be authenticated.
    assert main([*base, "--key", str(public)]) == 1
    assert "TG1209" in capsys.readouterr().out
    assert main(["ledger", "sign", "r1", "--ledger", str(ledger_path), "--key", str(private)]) == 0
    assert "signed run r1 run up to seq 0" in capsys.readouterr().err
    # The run head covers every rank's stream.
    assert main([*base, "--key", str(public)]) == 0
    assert "1 signed head(s) verified" in capsys.readouterr().out
    tamper(
        str(ledger_path),
        (
            "UPDATE trainguard_ledger_records SET payload = ? WHERE stream = ? AND seq = ?",
            ('{"grad_norm":0.5,"loss":0.1,"step_time":0.125}', 1, 1),
        ),
    )
    assert main([*base, "--key", str(public)]) == 1
    out = capsys.readouterr().out
    assert "critical TG1201 ledger-record-modified: run r1 stream 1 seq 1:" in out
    assert "FAIL: 1 critical" in out


def test_verify_fail_on_and_strict(
    ledger_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Records after the last signed head are TG1208 (info): not a break by default."""
    private, public = keys
    base = ["ledger", "verify", "r1", "--ledger", str(ledger_path), "--key", str(public)]
    assert main(["ledger", "sign", "r1", "--ledger", str(ledger_path), "--key", str(private)]) == 0
    with closing(open_ledger(str(ledger_path), create=False)) as ledger:
        ledger.append("r1", "step", {"loss": 0.5}, step=3, stream=0)
    capsys.readouterr()
    for flags, code in (([], 0), (["--strict"], 0), (["--fail-on", "info"], 1)):
        assert main([*base, *flags]) == code, flags
        out = capsys.readouterr().out
        assert "TG1208" in out
        assert out.splitlines()[-1].startswith("FAIL: 1 info" if code else "OK: "), flags
    assert main([*base, "--fail-on", "info", "-f", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 1 and doc["intact"] is True


def test_verify_errors_exit_2(
    ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.db"
    assert main(["ledger", "verify", "r1", "--ledger", str(missing)]) == 2
    assert not missing.exists()
    assert main(["ledger", "verify", "nope", "--ledger", str(ledger_path)]) == 2
    assert "no records for run 'nope'" in capsys.readouterr().err
    assert main(["ledger", "verify", "r1", "--ledger", "mysql://x/y"]) == 2
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    assert (
        main(["ledger", "verify", "r1", "--ledger", str(ledger_path), "--key", str(bad_key)]) == 2
    )


def test_ledger_defaults_to_the_environment(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRAINGUARD_LEDGER", raising=False)
    assert main(["ledger", "runs"]) == 2
    assert "--ledger" in capsys.readouterr().err
    monkeypatch.setenv("TRAINGUARD_LEDGER", str(ledger_path))
    assert main(["ledger", "runs"]) == 0
    assert capsys.readouterr().out == "r1\nr2\n"


def test_verify_json_and_sarif(
    ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper(
        str(ledger_path),
        ("DELETE FROM trainguard_ledger_records WHERE stream = ? AND seq = ?", (0, 1)),
    )
    base = ["ledger", "verify", "r1", "--ledger", str(ledger_path)]
    assert main([*base, "-f", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert (document["intact"], document["records"], document["streams"]) == (False, 7, 3)
    assert [f["rule"] for f in document["findings"]] == ["TG1202", "TG1210"]
    assert document["findings"][0]["offset"] == 1
    out = tmp_path / "ledger.sarif"
    assert main([*base, "-f", "sarif", "-o", str(out)]) == 1
    sarif = json.loads(out.read_text())
    jsonschema.validate(sarif, json.loads(SCHEMA.read_text()))
    results = sarif["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["TG1202", "TG1210"]


def test_hostile_strings_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.db"
    run = "r\x1b[2J\nfake"
    with closing(open_ledger(str(path))) as ledger:
        ledger.append(run, "step\x1b[31m", {"msg\n": "OK: \x1b[0mintact\r"}, step=0, stream=0)
        ledger.append(run, "alert", {"message": "\u202eevil"}, step=0, stream=0)
    assert main(["ledger", "show", run, "--ledger", str(path)]) == 0
    assert main(["ledger", "runs", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x0afake" in out and "\\u202eevil" in out


def test_sign_needs_an_existing_stream(
    ledger_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, _ = keys
    args = ["ledger", "sign", "r1", "--ledger", str(ledger_path), "--key", str(private)]
    assert main([*args, "--stream", "7"]) == 2
    assert "no record to sign" in capsys.readouterr().err
