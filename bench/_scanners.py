"""How to run each scanner on one file, and how to read its verdict reliably.

Every tool gets the same treatment: one subprocess per file, its own scratch
directory as the working directory (modelscan looks there for a settings file,
fickling writes its JSON there), and a verdict read from structured output
where the tool has one, since exit codes alone mislead for three of the peers:

* picklescan returns 2 whenever a parse error happened, even after it printed a
  dangerous global; so the summary counts decide, the exit code only says "error".
* modelscan returns 2 (errors) ahead of 1 (issues) and 3 when it skipped the file
  as "not a supported format"; its console JSON is line-wrapped by rich, so the
  report is read from ``-o FILE`` instead.
* fickling's CLI exits 1 both for "unsafe" and for a Python traceback (missing
  file); its JSON file is appended to once per stacked pickle.
* modelaudit returns 2 for an operational error even when it also recorded a
  critical finding; findings of severity warning/critical (or a failed check of
  that severity) are what its own exit code 1 means, so the JSON decides.

See ``bench/README.md`` for the quirks in prose.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from _runner import ChildResult

DETECTED = "detected"
CLEAN = "clean"
ERROR = "error"


@dataclass(frozen=True)
class Verdict:
    status: str  # DETECTED, CLEAN or ERROR
    severity: str  # the tool's own word for its worst result ("" when none)
    detail: str  # one line a human can check against the raw output


@dataclass(frozen=True)
class Tool:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (file, scratch dir) -> command line
    read: Callable[[ChildResult, Path], Verdict]  # (child, scratch dir) -> verdict
    env: Mapping[str, str]


def _first_line(text: str, pattern: str) -> str:
    for line in text.splitlines():
        if re.search(pattern, line):
            return line.strip()[:200]
    return ""


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


# -- trainguard ---------------------------------------------------------------


def _read_trainguard(child: ChildResult, scratch: Path) -> Verdict:
    try:
        doc = json.loads(child.stdout)
    except ValueError:
        doc = None
    verdict = ""
    detail = ""
    if isinstance(doc, dict):
        verdict = str(doc.get("verdict") or "")
        findings = [f for r in doc.get("files", []) for f in r.get("findings", [])]
        if findings:
            worst = max(findings, key=lambda f: _TG_RANK.get(str(f.get("severity")), -1))
            detail = f"{worst.get('rule')} {worst.get('severity')}: {worst.get('message')}"
        errors = [str(r.get("error")) for r in doc.get("files", []) if r.get("error")]
        if errors and not detail:
            detail = "error: " + errors[0]
    detail = detail[:200]
    # Exit codes are documented and the same for every verb: 1 findings at or above
    # --fail-on, 0 clean, 2 could not do the job (findings outrank errors).
    if child.returncode == 1:
        return Verdict(DETECTED, verdict, detail)
    if child.returncode == 0:
        return Verdict(CLEAN, verdict, detail)
    return Verdict(ERROR, verdict, detail or f"exit {child.returncode}: {_tail(child.stderr)}")


_TG_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}


def trainguard(python: str, env: Mapping[str, str], *, strict: bool = False) -> Tool:
    base = [python, "-m", "trainguard", "scan", "--format", "json", "--no-progress"]
    # --strict fails on medium findings too: shown beside the default so that a
    # sample rated "medium" is visibly caught, not silently counted as a miss.
    extra = ["--strict"] if strict else []
    return Tool(
        name="trainguard-strict" if strict else "trainguard",
        argv=lambda f, _s: [*base, *extra, str(f)],
        read=_read_trainguard,
        env=env,
    )


# -- picklescan ---------------------------------------------------------------


def _read_picklescan(child: ChildResult, scratch: Path) -> Verdict:
    out = child.stdout + "\n" + child.stderr
    dangerous = re.search(r"^Dangerous globals: (\d+)", out, re.M)
    infected = re.search(r"^Infected files: (\d+)", out, re.M)
    found = _first_line(out, r"import .* FOUND")
    if (dangerous and int(dangerous.group(1)) > 0) or (infected and int(infected.group(1)) > 0):
        return Verdict(DETECTED, "dangerous", found)
    if dangerous is None or child.returncode != 0:
        return Verdict(ERROR, "", _first_line(out, r"ERROR|rror") or _tail(out))
    scanned = re.search(r"^Scanned files: (\d+)", out, re.M)
    if scanned and int(scanned.group(1)) == 0:
        # Exit 0, but nothing was looked at (a .zip or .7z holding a model): that is
        # "did not scan", not "clean", the same as modelscan's exit 3.
        return Verdict(ERROR, "", "nothing scanned (Scanned files: 0, exit 0)")
    suspicious = re.search(r"^Suspicious globals: (\d+)", out, re.M)
    sev = "suspicious" if suspicious and int(suspicious.group(1)) > 0 else ""
    # A file picklescan could not parse at all is reported as a WARNING and exit 0:
    # the tool's own answer is "clean", and that is what is recorded.
    return Verdict(CLEAN, sev, _first_line(out, r"WARNING"))


def picklescan(venv: Path, env: Mapping[str, str]) -> Tool:
    exe = str(venv / "bin" / "picklescan")
    return Tool(
        name="picklescan",
        argv=lambda f, _s: [exe, "--path", str(f)],
        read=_read_picklescan,
        env=env,
    )


# -- modelscan ----------------------------------------------------------------


def _read_modelscan(child: ChildResult, scratch: Path) -> Verdict:
    report = scratch / "modelscan.json"
    try:
        doc = json.loads(report.read_text())
    except (OSError, ValueError):
        return Verdict(ERROR, "", f"exit {child.returncode}, no report: {_tail(child.stdout)}")
    issues = doc.get("issues") or []
    if issues:
        order = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
        worst = max(issues, key=lambda i: order.index(i.get("severity", "LOW")))
        return Verdict(
            DETECTED,
            str(worst.get("severity", "")),
            f"{worst.get('severity')}: {worst.get('description')}"[:200],
        )
    errors = doc.get("errors") or []
    if errors:
        return Verdict(ERROR, "", "error: " + str(errors[0].get("description"))[:190])
    if child.returncode == 3:
        return Verdict(ERROR, "", "skipped: no supported files (exit 3)")
    if child.returncode != 0:
        return Verdict(ERROR, "", f"exit {child.returncode}")
    return Verdict(CLEAN, "", "")


def modelscan_venv(venv: Path) -> Path:
    """modelscan's own venv inside the peers one, where it was given one.

    modelscan 0.8.8 calls ``numpy.lib.format._check_version``, gone since numpy 2.3,
    so with a current numpy every ``.npy`` scan is an error; modelaudit on the other
    hand pins numpy 2.4 on Python 3.11.  Giving modelscan a venv with numpy < 2.3
    measures the scanner rather than that packaging clash (bench/README.md).
    """
    own = venv / "modelscan"
    return own if (own / "bin" / "modelscan").exists() else venv


def modelscan(venv: Path, env: Mapping[str, str]) -> Tool:
    exe = str(modelscan_venv(venv) / "bin" / "modelscan")
    return Tool(
        name="modelscan",
        argv=lambda f, s: [
            exe,
            "scan",
            "-p",
            str(f),
            "-r",
            "json",
            "-o",
            str(s / "modelscan.json"),
        ],
        read=_read_modelscan,
        env=env,
    )


# -- fickling -----------------------------------------------------------------

_FICKLING_ORDER = [
    "LIKELY_SAFE",
    "POSSIBLY_UNSAFE",
    "SUSPICIOUS",
    "LIKELY_UNSAFE",
    "LIKELY_OVERTLY_MALICIOUS",
    "OVERTLY_MALICIOUS",
]


def _json_objects(text: str) -> list[dict[str, object]]:
    # fickling appends one JSON object per stacked pickle to the same file.
    decoder = json.JSONDecoder()
    objs: list[dict[str, object]] = []
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = decoder.raw_decode(text, i)
        if isinstance(obj, dict):
            objs.append(obj)
    return objs


def _fickling_rank(name: str) -> int:
    return _FICKLING_ORDER.index(name) if name in _FICKLING_ORDER else -1


def _read_fickling_cli(child: ChildResult, scratch: Path) -> Verdict:
    report = scratch / "fickling.json"
    objs: list[dict[str, object]] = []
    if report.exists():
        try:
            objs = _json_objects(report.read_text())
        except ValueError:
            objs = []
    if child.returncode in (0, 1) and objs:
        worst = max((str(o.get("severity", "")) for o in objs), key=_fickling_rank)
        analysis = next((str(o.get("analysis")) for o in objs if o.get("severity") == worst), "")
        detail = analysis.splitlines()[0][:200] if analysis else ""
        if child.returncode == 1 and _fickling_rank(worst) > 0:
            return Verdict(DETECTED, worst, detail)
        if child.returncode == 0:
            return Verdict(CLEAN, worst, detail)
    # Exit 2 is a parse failure ("No pickle files detected" for every torch zip);
    # exit 1 without a report is a Python traceback, not a verdict.
    err = _first_line(child.stderr, r"Error|error") or _tail(child.stderr)
    return Verdict(ERROR, "", f"exit {child.returncode}: {err}")


def fickling_cli(venv: Path, env: Mapping[str, str]) -> Tool:
    exe = str(venv / "bin" / "fickling")
    return Tool(
        name="fickling",
        argv=lambda f, s: [
            exe,
            "--check-safety",
            "--json-output",
            str(s / "fickling.json"),
            str(f),
        ],
        read=_read_fickling_cli,
        env=env,
    )


def _read_fickling_api(child: ChildResult, scratch: Path) -> Verdict:
    try:
        doc = json.loads(child.stdout)
    except ValueError:
        return Verdict(ERROR, "", f"exit {child.returncode}: {_tail(child.stderr)}")
    if "error" in doc:
        return Verdict(ERROR, "", str(doc["error"])[:200])
    sev = str(doc.get("severity", ""))
    members = doc.get("members") or {}
    detail = ", ".join(f"{k or '<file>'}={v}" for k, v in members.items())[:200]
    if doc.get("unsafe"):
        return Verdict(DETECTED, sev, detail)
    return Verdict(CLEAN, sev, detail)


def fickling_api(venv: Path, env: Mapping[str, str]) -> Tool:
    py = str(venv / "bin" / "python")
    script = str(Path(__file__).resolve().parent / "peers" / "fickling_api_scan.py")
    return Tool(
        name="fickling-api",
        argv=lambda f, _s: [py, script, str(f)],
        read=_read_fickling_api,
        env=env,
    )


# -- modelaudit ---------------------------------------------------------------

_MA_SECURITY = {"warning", "critical"}


def _read_modelaudit(child: ChildResult, scratch: Path) -> Verdict:
    report = scratch / "modelaudit.json"
    try:
        doc = json.loads(report.read_text())
    except (OSError, ValueError):
        return Verdict(ERROR, "", f"exit {child.returncode}, no report: {_tail(child.stderr)}")
    issues = [i for i in doc.get("issues") or [] if isinstance(i, dict)]
    checks = [c for c in doc.get("checks") or [] if isinstance(c, dict)]

    def sev(record: dict[str, object]) -> str:
        return str(record.get("severity", "")).lower()

    flagged = [i for i in issues if sev(i) in _MA_SECURITY]
    flagged += [c for c in checks if c.get("status") == "failed" and sev(c) in _MA_SECURITY]
    if flagged:
        worst = "critical" if any(sev(r) == "critical" for r in flagged) else "warning"
        first = next(r for r in flagged if sev(r) == worst)
        return Verdict(DETECTED, worst, str(first.get("message", ""))[:200])
    if child.returncode != 0:
        why = "errors" if doc.get("has_errors") else "inconclusive or nothing scanned"
        info = next((str(i.get("message")) for i in issues), "")
        return Verdict(ERROR, "", f"exit {child.returncode} ({why}) {info}"[:200])
    info = "info" if issues else ""
    return Verdict(CLEAN, info, "")


def modelaudit(venv: Path, env: Mapping[str, str]) -> Tool:
    exe = str(venv / "bin" / "modelaudit")
    return Tool(
        name="modelaudit",
        argv=lambda f, s: [
            exe,
            "scan",
            "--format",
            "json",
            "--no-cache",
            "-o",
            str(s / "modelaudit.json"),
            str(f),
        ],
        read=_read_modelaudit,
        env=env,
    )


def peer_env(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    # No telemetry, no hub lookups: the benchmark scans local files only.
    env.update(
        {
            "PROMPTFOO_DISABLE_TELEMETRY": "1",
            "NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def all_tools(
    venv: Path, trainguard_python: str, trainguard_env: Mapping[str, str]
) -> dict[str, Tool]:
    penv = peer_env(os.environ)
    tools = [
        trainguard(trainguard_python, trainguard_env),
        trainguard(trainguard_python, trainguard_env, strict=True),
        picklescan(venv, penv),
        modelscan(venv, penv),
        fickling_cli(venv, penv),
        fickling_api(venv, penv),
        modelaudit(venv, penv),
    ]
    return {t.name: t for t in tools}
