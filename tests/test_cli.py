"""The CLI end to end: exit codes, formats, policy and strictness."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import random
import re
import secrets
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import call1
from trainguard.cli._common import fail_on, run_id
from trainguard.cli.main import VERBS, build_parser, main
from trainguard.errors import TrainguardError, UnsafeModelError, UsageError
from trainguard.findings import Severity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    (tmp_path / "clean.pkl").write_bytes(pickle.dumps({"lr": 0.1, "steps": [1, 2]}))
    # A user's class constructed (NEWOBJ, then its state): medium. Calling it would be high.
    (tmp_path / "user.pkl").write_bytes(
        b"\x80\x02cmypkg.models\nNet\nq\x00)\x81}q\x01X\x01\x00\x00\x00wK\x01sb."
    )
    return tmp_path


def test_clean_exits_0(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(store / "clean.pkl")]) == 0
    assert "OK" in capsys.readouterr().out


def test_medium_passes_by_default_and_fails_with_strict(store: Path) -> None:
    assert main(["scan", str(store)]) == 0
    assert main(["scan", "--strict", str(store)]) == 1
    assert main(["scan", "--fail-on", "low", str(store)]) == 1


def test_critical_exits_1_with_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    assert main(["scan", "--format", "json", str(store)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "critical" and doc["exit_code"] == 1
    evil = next(f for f in doc["files"] if f["path"].endswith("evil.bin"))
    assert evil["findings"][0]["rule"] == "TG101"
    assert evil["findings"][0]["trigger"] == "os.system"


def test_sarif_output_file(store: Path, tmp_path: Path) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    out = tmp_path / "out.sarif"
    assert main(["scan", "--format", "sarif", "-o", str(out), str(store)]) == 1
    doc = json.loads(out.read_text())
    assert doc["version"] == "2.1.0"
    assert any(r["ruleId"] == "TG101" for r in doc["runs"][0]["results"])


def test_policy_allows_user_class(store: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\nglobals = ["mypkg.models"]\n')
    assert main(["scan", "--strict", "--policy", str(policy), str(store)]) == 0


def test_policy_cannot_allow_os_system(store: Path, tmp_path: Path) -> None:
    (store / "evil.bin").write_bytes(call1("os", "system", "id"))
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\nglobals = ["os", "os.system"]\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 1


def test_policy_severity_change(store: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[severity]\nTG103 = "high"\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 1


def test_bad_policy_is_usage_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[severity]\nTG999 = "loud"\n[allow]\nglobals = "x"\n')
    assert main(["scan", "--policy", str(policy), str(store)]) == 2
    err = capsys.readouterr().err
    assert "TG999" in err and "globals must be a list" in err


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    assert main(["scan", str(tmp_path / "nope")]) == 2


def test_unknown_file_is_info_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["scan", "--format", "json", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"][0]["findings"][0]["rule"] == "TG001"


def test_rules_markdown_matches_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "rules.md").read_text()


def test_python_dash_m_entry_point(store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainguard", "scan", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# -- main(): what goes wrong maps to 2 (never 1, which means findings) ---------------------


def _seed() -> tuple[random.Random, str]:
    """A fresh seed each run; the second value goes into assertion messages to rerun it."""
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED") or secrets.randbits(32))
    return random.Random(seed), f"TRAINGUARD_TEST_SEED={seed}"


def _builtin_exceptions() -> list[type[Exception]]:
    """Every built-in Exception subclass that takes one message (OSError, KeyError, ...)."""
    found, todo = [], [Exception]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ != "builtins" or issubclass(cls, BrokenPipeError):
            continue  # a broken pipe has its own test
        try:
            cls("message")
        except TypeError:
            continue  # UnicodeDecodeError and friends need five arguments
        found.append(cls)
    return found


def _surprise(rng: random.Random) -> Exception:
    # Messages quote names from files: control characters and line breaks included.
    alphabet = "abc xyz/.\n\r\t\x1b[31m\x00\u202e\u00e9"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))

    classes = _builtin_exceptions()
    if rng.random() < 0.3:  # as the system raises it: errno, message, file name
        cls = rng.choice([c for c in classes if issubclass(c, OSError)])
        return cls(rng.randrange(1, 100), text() or "refused", text())
    return rng.choice(classes)(text())


def _assert_one_error_line(err: str, exc: Exception | None = None, seed: str = "") -> None:
    """One printable line; an OSError the system raised is the user's error, not ours."""
    lines = err.splitlines()
    assert len(lines) == 1, (seed, err)
    system = isinstance(exc, OSError) and exc.strerror
    prefix = "trainguard: error: " if system else "trainguard: internal error: "
    assert lines[0].startswith(prefix), (seed, err)
    assert lines[0].isprintable() and "Traceback" not in err, (seed, err)
    if exc is not None and not system:
        assert f": {type(exc).__name__}" in lines[0], (seed, err)


def test_unexpected_exception_in_a_verb_exits_2_with_one_line(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import trainguard.scanner

    rng, seed = _seed()
    for _ in range(8):
        exc = _surprise(rng)

        def broken(*args: object, exc: Exception = exc, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr(trainguard.scanner, "scan", broken)
        monkeypatch.delenv("TRAINGUARD_DEBUG", raising=False)
        assert main(["scan", "--no-progress", str(store)]) == 2, (seed, exc)
        captured = capsys.readouterr()
        assert captured.out == "", seed
        _assert_one_error_line(captured.err, exc, seed)
        # The traceback, for a bug report: with --debug or TRAINGUARD_DEBUG=1 only.
        assert main(["--debug", "scan", "--no-progress", str(store)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.splitlines()[-1].startswith("trainguard: "), seed
        assert main(["scan", "--no-progress", "--debug", str(store)]) == 2  # after the verb
        assert "Traceback" in capsys.readouterr().err, seed
        monkeypatch.setenv("TRAINGUARD_DEBUG", "1")
        assert main(["scan", "--no-progress", str(store)]) == 2
        assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("exc", "code", "prefix"),
    [
        (KeyboardInterrupt(), 130, "trainguard: interrupted"),
        (BrokenPipeError(32, "Broken pipe"), 2, ""),
        (UsageError("bad\x1b[2J flag"), 2, "trainguard: error: bad\\x1b[2J flag"),
        (TrainguardError("could not read it"), 2, "trainguard: could not read it"),
        (UnsafeModelError("m.pt", []), 1, "trainguard: refused to load m.pt"),
    ],
)
def test_trainguard_errors_and_interrupts_keep_their_codes(
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    code: int,
    prefix: str,
) -> None:
    import trainguard.scanner

    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(trainguard.scanner, "scan", broken)
    assert main(["scan", "--no-progress", str(store)]) == code
    err = capsys.readouterr().err
    assert err.startswith(prefix) and (prefix or not err)


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every verb and sub-verb's parser, with its help line in the parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from _leaves(sub, (*path, name))


def _is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """The shortest arguments the parser accepts: a value for each required one."""
    argv: list[str] = []
    groups = [g for g in parser._mutually_exclusive_groups if g.required]
    chosen = {id(g._group_actions[0]) for g in groups}
    for action in parser._actions:
        if action.option_strings:
            if action.required or id(action) in chosen:
                argv.append(action.option_strings[-1])
                if action.nargs != 0:
                    argv.append(str(action.choices[0]) if action.choices else "1")
        elif action.nargs not in ("?", "*") and not isinstance(action, argparse._SubParsersAction):
            argv.append("x")
    return argv


def test_every_verb_has_a_description_and_a_help_line() -> None:
    verbs = list(_leaves(build_parser()))
    assert {path[0] for path, _, _ in verbs} == set(VERBS)
    for path, parser, help_line in verbs:
        assert parser.description and help_line, path
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (path, action.dest)


def test_a_crash_in_any_verb_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every leaf verb, its handler replaced by one that fails: the catch-all holds for all."""
    import trainguard.cli.main as cli_main

    real = cli_main.build_parser

    def crash(args: argparse.Namespace) -> int:
        raise RuntimeError(f"crash in {args.command}")

    def crashing_parser(verb: str | None = None) -> argparse.ArgumentParser:
        parser = real(verb)
        for _, sub, _ in _leaves(parser):
            sub.set_defaults(handler=crash)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", crashing_parser)
    leaves = [(path, p) for path, p, _ in _leaves(real()) if _is_leaf(p)]
    assert len(leaves) >= len(set(VERBS))
    for path, parser in leaves:
        assert main([*path, *_minimal_argv(parser)]) == 2, path
        _assert_one_error_line(capsys.readouterr().err)


def test_a_verb_builds_only_its_own_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainguard scan` must not pay for the other verbs' modules and parsers."""
    import trainguard.cli.main as cli_main

    imported: list[str] = []
    real = importlib.import_module

    def spy(name: str, package: str | None = None) -> types.ModuleType:
        imported.append(name)
        return real(name, package)

    monkeypatch.setattr(cli_main.importlib, "import_module", spy)
    for verb, module in VERBS.items():
        imported.clear()
        build_parser(verb)
        assert imported == [module], verb
    imported.clear()
    build_parser(None)
    assert sorted(imported) == sorted(set(VERBS.values()))


# -- the same conventions in every verb ---------------------------------------------------

VERDICT_VERBS = {
    ("scan",),
    ("verify",),
    ("env", "verify"),
    ("env", "snapshot"),
    ("diff",),
    ("ledger", "verify"),
    ("run",),
    ("convert",),
    ("store", "watch"),
}


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_fail_on_and_strict_mean_the_same_in_every_verb_with_a_verdict() -> None:
    rng, seed = _seed()
    with_verdict = set()
    for path, parser, _ in _leaves(build_parser()):
        if _option(parser, "--fail-on") is None:
            assert _option(parser, "--strict") is None, path
            continue
        with_verdict.add(path)
        rest = _minimal_argv(parser)  # options first: `run` takes the rest as the script's

        def parse(*flags: str, path: tuple[str, ...] = path, rest: list[str] = rest) -> Severity:
            return fail_on(build_parser().parse_args([*path, *flags, *rest]))

        assert parse() == Severity.HIGH, path
        assert parse("--strict") == Severity.MEDIUM, path
        severity = rng.choice(list(Severity))
        spelled = rng.choice([str(severity), str(severity).upper(), f" {severity} "])
        assert parse("--fail-on", spelled) == severity, (path, spelled, seed)
    assert with_verdict == VERDICT_VERBS


def test_verify_strict_fails_on_medium_and_takes_fail_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import trainguard.signing

    seen: list[Severity] = []

    def verify_report(*args: object, fail_on: Severity, **kwargs: object) -> None:
        seen.append(fail_on)
        raise UsageError("stop here")

    monkeypatch.setattr(trainguard.signing, "verify_report", verify_report)
    base = ["verify", str(tmp_path), "--key", "k.pub", "--no-progress"]
    for extra in ([], ["--strict"], ["--fail-on", "low"]):
        assert main([*base, *extra]) == 2
    assert seen == [Severity.HIGH, Severity.MEDIUM, Severity.LOW]
    assert main([*base, "--strict", "--fail-on", "critical"]) == 2  # contradictory


def test_the_run_is_positional_everywhere_and_run_is_a_hidden_alias(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with_run = []
    for path, parser, _ in _leaves(build_parser()):
        run = next((a for a in parser._actions if a.dest == "run"), None)
        if run is None:
            continue
        with_run.append(path)
        assert not run.option_strings, path
        alias = _option(parser, "--run")
        assert alias is not None and alias.help == argparse.SUPPRESS, path
        rest = [a for a in _minimal_argv(parser) if a != "x"]
        parse = build_parser().parse_args
        assert run_id(parse([*path, "r-1", *rest])) == "r-1"
        assert run_id(parse([*path, *rest, "--run", "r-1"])) == "r-1"
        assert "deprecated" in capsys.readouterr().err
        with pytest.raises(UsageError):
            run_id(parse([*path, "r-1", *rest, "--run", "r-2"]))
        with pytest.raises(UsageError):
            run_id(parse([*path, *rest]))
    assert {p[-1] for p in with_run} >= {"replay", "report", "show", "verify", "sign"}


def test_trainguard_run_passes_the_scripts_exit_and_a_crash_is_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit codes only: what protect() refuses is tests/test_load_flows.py's (in a subprocess),
    so here protect() is a no-op and the script runs in this process."""
    import trainguard

    def no_protect(**kwargs: object) -> None:
        return None

    # Both spellings a verb may import it by: the package's name and its module's.
    for name in ("trainguard.loader", "trainguard.loader.protect"):
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "protect", None), types.ModuleType):
            monkeypatch.setattr(module, "protect", no_protect)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "job.py"
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(script)])
    assert exit_.value.code == 3
    script.write_text("def step():\n    raise ValueError('bad batch')\nstep()\n")
    assert main(["run", str(script)]) == 2
    err = capsys.readouterr().err
    # The user's own traceback, as python would show it, then one line of ours.
    assert "Traceback" in err and "ValueError: bad batch" in err and "in step" in err
    assert err.splitlines()[-1] == f"trainguard: {script} raised ValueError (above)"
    assert not trainguard.is_protected()


def test_docs_cli_lists_every_command() -> None:
    """docs/cli.md's table names each command, so a new verb cannot go undocumented."""
    table = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").split("## Exit codes")[0]
    first_cells = re.findall(r"^\| ([^|]+)\|", table, re.M)
    listed = {word for cell in first_cells for word in re.findall(r"`([\w-]+)", cell)}
    assert set(VERBS) <= listed, set(VERBS) - listed
