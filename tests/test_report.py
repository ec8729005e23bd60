"""``trainguard report`` on real watched runs: a tampered step, a tampered ledger, a clean run.

Each run is a tiny CPU training loop under ``trainguard.watch`` writing to a
temporary SQLite ledger (``tests/watch_scenarios.py``); tampering is done the
way ``tests/test_watch.py`` (weights edited between steps) and
``tests/test_ledger_verify.py`` (SQL on the ledger) do it.
"""

from __future__ import annotations

import html.parser
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from tests.test_ledger_support import BACKENDS, backend_url, tamper  # noqa: E402
from trainguard.cli.main import main  # noqa: E402
from trainguard.ledger import open_ledger  # noqa: E402
from trainguard.signing.keys import write_keypair  # noqa: E402

HOSTILE_RUN = 'run<script>alert("id")</script>'
HOSTILE_MESSAGE = "</td><script>alert(1)</script><img src=x onerror=alert(2)>\x1b[2J"
TAMPERED_AT = 30  # weights edited after this step: TG1301 at the next one
RECORDS = "trainguard_ledger_records"


def watched_run(
    tmp_path: Path,
    run_id: str,
    *,
    steps: int = 50,
    tampered: bool = True,
    checkpoints: bool = False,
    url: str | None = None,
) -> tuple[str, Path]:
    """A signed watched run in ``url`` (default ``tmp_path/run.db``); the public key's path."""
    private, public = write_keypair(tmp_path / "signer")
    url = url or str(tmp_path / "run.db")
    saved: dict[int, Path] = {}

    def sabotage(step: int, model: Any, opt: Any) -> None:
        if tampered and step == TAMPERED_AT:
            with torch.no_grad():
                model[0].bias.add_(0.5)
        if checkpoints and step in (19, 39):
            saved[step + 1] = tmp_path / f"ckpt-{step + 1}.pt"
            torch.save({"model": model.state_dict()}, saved[step + 1])

    sc.run(steps, sabotage=sabotage, ledger=url, run_id=run_id, sign_key=private, sign_every=20)
    if checkpoints:
        with open_ledger(url) as ledger:
            for step, path in saved.items():
                ledger.append(run_id, "checkpoint", {"path": str(path)}, step=step, stream=0)
            # Records after the run's final head are unauthenticated (TG1212) unless the
            # key holder signs them, as here.
            ledger.sign_head(run_id, 0, private)
    return url, public


def report(*args: str) -> tuple[int, str]:
    """``trainguard report ARGS`` as (exit code, what it wrote to stdout or -o)."""
    out = [a for i, a in enumerate(args) if i and args[i - 1] == "-o"]
    code = main(["report", *args])
    return code, Path(out[0]).read_text(encoding="utf-8") if out else ""


def write_report(tmp_path: Path) -> Path:
    """The HTML report of a run with a tampered step and hostile strings in its ledger."""
    url, public = watched_run(tmp_path, HOSTILE_RUN, steps=50)
    with open_ledger(url) as ledger:
        ledger.append(
            HOSTILE_RUN,
            "alert",
            {
                "rule": "<b>TG9999</b>",
                "severity": "<i>high</i>",
                "message": HOSTILE_MESSAGE,
                "evidence": {"<svg onload=alert(3)>": ["<script>x</script>", 1]},
            },
            step=40,
            stream=0,
        )
        # Signed by the run's key: the strings reach the report from an intact ledger.
        ledger.sign_head(HOSTILE_RUN, 0, tmp_path / "signer.pem")
    page = tmp_path / "report.html"
    code = main(["report", HOSTILE_RUN, "--ledger", url, "--key", str(public), "-o", str(page)])
    assert code == 1
    return page


class _Elements(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


# -- the tampered run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_report(tmp_path_factory.mktemp("hostile")).read_text(encoding="utf-8")


def test_html_names_the_tampered_step_and_rule(hostile_report: str) -> None:
    doc = parse(hostile_report)
    text = " ".join(doc.text)
    assert "TG1301" in text and "weights-changed-outside-step" in text
    assert "0.bias" in text  # the evidence: which tensor changed
    row = re.search(
        r"<tr><td class=\"n\">(\d+)</td><td class=\"n\">0</td><td><span class=\"sev "
        r"sev-critical\">critical</span></td><td><code>TG1301</code>",
        hostile_report,
    )
    assert row and int(row.group(1)) == TAMPERED_AT + 1
    # The alert is marked on every chart at its step.
    marks = re.findall(r"<title>step (\d+): alert: rank 0: TG1301", hostile_report)
    assert marks == [str(TAMPERED_AT + 1)] * 3
    assert "ledger intact" in text
    assert re.search(r"\d+ signed heads? verified with the given key", text)


def test_html_escapes_everything_from_the_ledger(hostile_report: str) -> None:
    doc = parse(hostile_report)
    tags = [t for t, _ in doc.tags]
    assert "script" not in tags and "img" not in tags and "b" not in tags and "i" not in tags
    for tag, attrs in doc.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    text = "".join(doc.text)
    # The strings are shown, as text: the run id in the title and heading, the message.
    assert HOSTILE_RUN in text
    assert "</td><script>alert(1)</script><img src=x onerror=alert(2)>\\x1b[2J" in text
    assert "<svg onload=alert(3)>" in text and "<b>TG9999</b>" in text
    assert "\x1b" not in hostile_report


def test_html_is_self_contained_under_a_strict_policy(hostile_report: str) -> None:
    import base64
    import hashlib

    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', hostile_report)
    assert policy
    directives = dict(d.strip().split(" ", 1) for d in policy.group(1).split(";"))
    assert directives["default-src"] == "'none'"
    assert "unsafe-inline" not in policy.group(1) and "script-src" not in directives
    styles = re.findall(r"<style>(.*?)</style>", hostile_report, re.S)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert directives["style-src"] == f"'sha256-{digest}'"
    assert ' style="' not in hostile_report  # attributes would need 'unsafe-inline'
    assert not re.search(r"(src|href)=\"(?!#)", hostile_report)  # nothing fetched
    assert "@import" not in hostile_report and "url(" not in hostile_report
    charts = re.findall(r"<svg[^>]*class=\"chart\">.*?</svg>", hostile_report, re.S)
    assert len(charts) == 3
    for svg in charts:
        root = ET.fromstring(svg)  # noqa: S314 - our own output, checked to be well-formed XML
        assert root.get("role") == "img" and root.get("aria-labelledby")
        assert "nan" not in svg.lower() and "inf" not in svg.lower()


def test_text_report_of_the_tampered_run(tmp_path: Path) -> None:
    url, public = watched_run(tmp_path, "r1")
    code = main(
        ["report", "r1", "--ledger", url, "--key", str(public), "-o", str(tmp_path / "r.txt")]
    )
    text = (tmp_path / "r.txt").read_text(encoding="utf-8")
    assert code == 1
    assert re.search(
        rf"critical TG1301 weights-changed-outside-step  step {TAMPERED_AT + 1} rank 0", text
    )
    assert "tensors: 0.bias" in text
    assert "ledger intact" in text and "signed heads verified" in text
    assert text.rstrip().splitlines()[-1].startswith("FAIL: 1 alert (1 critical); ledger intact")
    marks = next(line for line in text.splitlines() if line.lstrip().startswith("marks"))
    assert "!" in marks and "x" not in marks.split("(")[0]


def test_json_report(tmp_path: Path) -> None:
    url, _ = watched_run(tmp_path, "r1")
    code, out = report("r1", "--ledger", url, "-o", str(tmp_path / "r.json"))
    doc = json.loads(out)
    assert code == 1 and doc["exit_code"] == 1 and doc["kind"] == "run-report"
    assert [(a["rule"], a["step"]) for a in doc["alerts"]] == [("TG1301", TAMPERED_AT + 1)]
    assert doc["verification"]["intact"] is True
    # No --key: the heads are checked with the run key the run-start record names.
    assert doc["verification"]["signatures_checked"] is True
    assert doc["verification"]["key_source"] == "run"
    assert doc["verification"]["signed_heads"] == doc["verification"]["heads_present"] >= 3
    points = doc["timeline"]["0"]["loss"]["points"]
    assert [p[0] for p in points] == list(range(50))  # 50 steps: nothing thinned


# -- a ledger edited after the run ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_ledger_fails_verification_and_is_marked(tmp_path: Path, backend: str) -> None:
    with backend_url(backend, tmp_path) as url:
        edited_ledger(tmp_path, url)


def edited_ledger(tmp_path: Path, url: str) -> None:
    url, public = watched_run(tmp_path, "r1", tampered=False, url=url)
    with open_ledger(url) as ledger:
        row = next(r for r in ledger.records("r1", 0) if r.kind == "step" and r.step == 40)
    payload = json.dumps({**row.payload, "loss": 0.001}, sort_keys=True, separators=(",", ":"))
    tamper(
        url,
        (
            f"UPDATE {RECORDS} SET payload = ? WHERE run_id = ? AND stream = ? AND seq = ?",  # noqa: S608
            (payload, "r1", 0, row.seq),
        ),
    )
    code, page = report("r1", "--ledger", url, "--key", str(public), "-o", str(tmp_path / "r.html"))
    assert code == 1
    text = " ".join(parse(page).text)
    assert "ledger verification FAILED: 1x TG1201" in text
    assert "The monitor raised no alert" in text
    assert re.findall(r"<title>step (\d+): ledger break", page) == ["40"] * 3
    code, out = report("r1", "--ledger", url, "-f", "json", "-o", str(tmp_path / "r.json"))
    doc = json.loads(out)
    assert doc["verification"]["intact"] is False
    assert [(f["rule"], f["offset"]) for f in doc["verification"]["findings"]] == [
        ("TG1201", row.seq)
    ]


def test_clean_run_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, public = watched_run(tmp_path, "clean", tampered=False)
    assert main(["report", "clean", "--ledger", url, "--key", str(public)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("OK: no alerts; ledger intact")
    assert "environment not checked" in out


def test_errors_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = watched_run(tmp_path, "r1", steps=3, tampered=False)
    assert main(["report", "other", "--ledger", url]) == 2
    assert main(["report", "r1", "--ledger", str(tmp_path / "missing.db")]) == 2
    assert main(["report", "r1", "--ledger", url, "--diff", "a.pt", "b.pt"]) == 2
    assert main(["report", "r1", "--ledger", url, "-o", str(tmp_path / "no" / "r.html")]) == 2
    assert "no records for run 'other'" in capsys.readouterr().err


# -- checkpoints around the alert ----------------------------------------------------------
def test_recorded_checkpoints_are_diffed_around_the_alert(tmp_path: Path) -> None:
    url, _ = watched_run(tmp_path, "r1", checkpoints=True)
    code, text = report("r1", "--ledger", url, "-f", "text", "-o", str(tmp_path / "r.txt"))
    assert code == 1
    assert f"TG1301 at step {TAMPERED_AT + 1}: {tmp_path / 'ckpt-20.pt'} -> " in text
    assert "(steps 20 -> 40)" in text and "model.0.bias: changed" in text

    # Moved elsewhere: found by name in --checkpoint-dir; files outside it are not opened.
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "ckpt-20.pt").rename(moved / "ckpt-20.pt")
    (tmp_path / "ckpt-40.pt").rename(moved / "ckpt-40.pt")
    code, text = report(
        "r1", "--ledger", url, "--checkpoint-dir", str(moved), "-o", str(tmp_path / "r.txt")
    )
    assert f"{moved / 'ckpt-20.pt'} -> {moved / 'ckpt-40.pt'}" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = report(
        "r1", "--ledger", url, "--checkpoint-dir", str(empty), "-o", str(tmp_path / "r.txt")
    )
    assert "not found in" in text and "checkpoints 2 checkpoint records; no diff" in text


def test_explicit_diff_and_a_modified_checkpoint(tmp_path: Path) -> None:
    from trainguard.explain.report.diffs import CheckpointRef, checkpoint_diffs

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(4)}, a)
    torch.save({"w": torch.tensor([0.0, 0.0, 1.0, 0.0])}, b)
    url, _ = watched_run(tmp_path, "r1", steps=3, tampered=False)
    code, text = report(
        "r1", "--ledger", url, "--diff", str(a), str(b), "-o", str(tmp_path / "r.txt")
    )
    assert code == 0  # a plain change is no finding
    assert "--diff: " in text and "w: changed, 1/4 elements" in text

    from blake3 import blake3

    refs = [
        CheckpointRef(10, str(a), blake3(a.read_bytes()).hexdigest()),
        CheckpointRef(20, str(b), "0" * 64),  # not what b holds: changed since it was saved
    ]
    diffs, notes = checkpoint_diffs(refs, [(15, "TG1301 at step 15")])
    assert notes == [] and len(diffs) == 1
    assert diffs[0].modified == [str(b)] and diffs[0].failed


# -- environment status --------------------------------------------------------------------
def test_environment_status_from_the_run_start_record(tmp_path: Path) -> None:
    from trainguard.explain.report.build import build_report

    url = str(tmp_path / "env.db")
    with open_ledger(url) as ledger:
        ledger.append(
            "ok",
            "run-start",
            {"environment": {"snapshot": "env.json", "differing": 0}},
            step=0,
            stream=0,
        )
        ledger.append(
            "bad",
            "run-start",
            {"environment": {"snapshot": "env.json", "differing": 1}},
            step=0,
            stream=0,
        )
        ledger.append(
            "bad",
            "alert",
            {
                "rule": "TG1312",
                "severity": "critical",
                "message": "1 file(s) differ",
                "evidence": {"files": ["/site/torch/optim/adamw.py"]},
            },
            step=0,
            stream=0,
        )
        ok = build_report(ledger, "ok")
        bad = build_report(ledger, "bad")
    assert (ok.environment.state, ok.environment.snapshot) == ("matches", "env.json")
    assert ok.exit_code() == 0
    assert bad.environment.state == "differs"
    assert bad.environment.files == ["/site/torch/optim/adamw.py"]
    assert bad.exit_code() == 1
    with open_ledger(url) as ledger:  # the check found files, but its alert is not there
        ledger.append(
            "hidden",
            "run-start",
            {"environment": {"snapshot": "env.json", "differing": 2}},
            step=0,
            stream=0,
        )
        hidden = build_report(ledger, "hidden")
    assert hidden.environment.state == "differs" and hidden.exit_code() == 1


def test_guard_records_the_environment_check_in_run_start(tmp_path: Path) -> None:
    url = str(tmp_path / "run.db")
    sc.run(2, ledger=url, run_id="r")
    with open_ledger(url) as ledger:
        start = next(r for r in ledger.records("r") if r.kind == "run-start")
    assert "environment" in start.payload and start.payload["environment"] is None


# -- hostile values and large runs ---------------------------------------------------------
def test_odd_values_render(tmp_path: Path) -> None:
    from trainguard.explain.report.build import build_report
    from trainguard.render import render

    url = str(tmp_path / "odd.db")
    values: list[Any] = [1e308, -1e308, math.nan, math.inf, "2.0", True, None, [1], 5e-324, 0.0]
    with open_ledger(url) as ledger:
        for i, v in enumerate(values):
            ledger.append(
                "odd",
                "step",
                {"loss": v, "grad_norm": v, "step_time": v},
                step=i * 10**17,
                stream=0,
            )
        ledger.append("odd", "step", {"loss": 1.0}, step=-5, stream=3)
        rep = build_report(ledger, "odd")
    page = render(rep, "html", tool_version="test")
    for svg in re.findall(r"<svg[^>]*class=\"chart\">.*?</svg>", page, re.S):
        ET.fromstring(svg)  # noqa: S314 - our own output
        assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert "9 step values were not numbers" in " ".join(rep.notes)  # "2.0", True, [1] x 3 metrics
    assert rep.timelines[0].metrics["loss"].nonfinite == 2
    json.loads(render(rep, "json", tool_version="test"))
    assert "not finite" in render(rep, "text", tool_version="test")


def test_long_series_are_thinned_and_keep_spikes() -> None:
    from trainguard.explain.report.series import MAX_BUCKETS, Series

    s = Series()
    for step in range(200_000):
        s.add(step, 100.0 if step == 123_457 else 1.0 + (step % 7) * 0.01)
    points = s.points()
    assert len(s.buckets) <= MAX_BUCKETS and len(points) <= 2 * MAX_BUCKETS
    assert (123_457, 100.0) in points
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    assert s.count == 200_000 and s.highest == 100.0 and s.lowest == 1.0


def test_checkpoint_pairs_span_each_alert_step() -> None:
    from trainguard.explain.report.diffs import MAX_DIFFS, CheckpointRef, plan_pairs

    refs = [CheckpointRef(s, f"c{s}.pt") for s in (30, 0, 10, 20)]
    alerts = [(s, f"alert at {s}") for s in (15, 20, 30, 0, 35, 12)]
    pairs, notes = plan_pairs(refs, alerts)
    # A checkpoint at the alert's own step may predate the change: take the next one.
    assert [(a.step, b.step, why) for a, b, why in pairs] == [
        (10, 20, "alert at 15"),
        (10, 30, "alert at 20"),
        (20, 30, "alert at 30"),  # none after 30: the one at 30 is the best there is
    ]  # 12 gives (10, 20) again: diffed once
    assert notes == ["2 alert step(s) have no recorded checkpoint on both sides, not diffed: 0, 35"]
    many = [CheckpointRef(s, f"c{s}.pt") for s in range(0, 100, 10)]
    pairs, notes = plan_pairs(many, [(s, "") for s in range(5, 90, 10)])
    assert len(pairs) == MAX_DIFFS and notes == [
        f"{9 - MAX_DIFFS} more checkpoint pairs not diffed (at most {MAX_DIFFS} per report)"
    ]


def test_repeated_alerts_are_grouped_and_the_first_step_is_named() -> None:
    from trainguard.explain.report.build import AlertEntry, group_alerts
    from trainguard.render.run_words import group_steps

    def alert(
        step: int, rule: str = "TG1306", message: str = "flipped", intact: bool = True
    ) -> Any:
        return AlertEntry(step, 0, step, rule, "update-direction", "critical", message, [], intact)

    alerts = [alert(25, "TG1304", "patched"), *(alert(s) for s in range(25, 30))]
    alerts += [alert(31, message="other"), alert(33), alert(34, intact=False), alert(35)]
    groups = [(g.first.rule, group_steps(g), g.count) for g in group_alerts(alerts)]
    assert groups == [
        ("TG1304", "25", 1),
        ("TG1306", "25-29", 5),
        ("TG1306", "31", 1),
        ("TG1306", "33", 1),  # a gap of a step starts a new group
        ("TG1306", "34", 1),  # a record that fails verification stands alone
        ("TG1306", "35", 1),
    ]


def test_text_report_groups_a_persistent_sabotage(tmp_path: Path) -> None:
    def flip_every_step(step: int, model: Any, opt: Any) -> None:
        if step == 29:
            original = torch.nn.utils.clip_grad_norm_

            def flipped(parameters: Any, max_norm: float, *a: Any, **k: Any) -> Any:
                params = [p for p in parameters if p.grad is not None]
                total = original(params, max_norm, *a, **k)
                for p in params:
                    p.grad.neg_()
                return total

            torch.nn.utils.clip_grad_norm_ = flipped
            flip_every_step.undo = lambda: setattr(torch.nn.utils, "clip_grad_norm_", original)  # type: ignore[attr-defined]

    ledger = str(tmp_path / "runs.db")
    try:
        sc.run(60, ledger=ledger, run_id="persist", sabotage=flip_every_step)
    finally:
        getattr(flip_every_step, "undo", lambda: None)()
    code, out = report("persist", "--ledger", ledger, "-o", str(tmp_path / "report.txt"))
    assert code == 1
    assert "start here: the first alert is at step 30" in out
    assert re.search(r"TG1306 update-direction  step 30-59 rank 0 \(30 alerts, one per step\)", out)
