"""With default settings, rewritten history fails ``ledger verify``; honest ends pass.

Red team 4 (ledger): a run rewritten whole under a fresh run key (alerts deleted,
re-hashed, heads re-signed: A1) verified with exit 0, and one stripped of its keys to
look unsigned (A2b) got a medium note only; an honest run ended by SIGTERM (the
preemption signal) failed with TG1211.  watch now appends rank 0's run key id to the
anchor file (tests/conftest.py points it at a temporary folder) and verify pins it.

Generated (seed printed; ``TRAINGUARD_TEST_SEED`` replays): each family of history
rewrites applied to a freshly recorded run, in place (the anchor names the ledger's
own path), with random parameters; each must fail with the rule it is expected to
raise.  Honest runs ended normally, by Ctrl-C, by an exception and by SIGTERM at a
random step (a subprocess) verify clean.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.seeds import seeded  # noqa: E402
from tests.test_ledger_signed import _resign, cut_tail  # noqa: E402
from tests.test_ledger_support import Row, raw_rows, rewrite_stream, tamper  # noqa: E402
from trainguard.cli.main import main  # noqa: E402
from trainguard.ledger.chain import canonical_json, parse_payload  # noqa: E402
from trainguard.ledger.runkey import new_run_key  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402

STEPS = 14
SIGN_EVERY = 4  # periodic heads to cut back to
TAMPERED_AT = 5  # the run's one alert (TG1301) is at the step after


def record(url: str, run: str, *, end: str = "normal", stop: int = STEPS, **kw: Any) -> Any:
    """A small watched run; ``end``: normal, ctrl-c or exception (at step ``stop``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    kw.setdefault("sign_every", SIGN_EVERY)
    try:
        with tgw.watch(model, opt, ledger=url, run_id=run, hang_seconds=None, **kw) as guard:
            for step in range(STEPS):
                if step == stop and end == "ctrl-c":
                    raise KeyboardInterrupt
                if step == stop and end == "exception":
                    raise RuntimeError("out of memory, say")
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                guard.step(loss=loss)
                if end == "sabotaged" and step == TAMPERED_AT:
                    with torch.no_grad():
                        model[0].bias.add_(0.5)
    except (KeyboardInterrupt, RuntimeError):
        pass  # the with block closed the guard with it, as a script's end would
    return guard


def verify(url: str, run: str, *extra: str) -> tuple[int, dict[str, Any]]:
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    out = Path(name)
    try:
        code = main(["ledger", "verify", run, "--ledger", url, "-f", "json", "-o", name, *extra])
        return code, json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def rules(document: dict[str, Any]) -> dict[str, str]:
    return {f["rule"]: f["severity"] for f in document["findings"]}


# -- what an insider with write access to the database does ---------------------------
def _alerts(url: str, run: str) -> set[int]:
    return {r["seq"] for r in raw_rows(url, run, 0) if r["kind"] == "alert"}


def rewrite_fresh_key(url: str, run: str, rng: random.Random) -> str:
    """A1: rank 0's stream and the run stream rewritten whole under a fresh key."""
    key = new_run_key()
    _resign(url, run, 0, key, drop=_alerts(url, run), claim_old=False, run_start=True)
    _resign(url, run, -1, key, drop=set(), claim_old=False, run_start=False)
    return "rewritten whole under a fresh key, alerts dropped"


def strip_keys(url: str, run: str, rng: random.Random) -> str:
    """A2b: run keys removed (fields gone, or null), heads and the run stream dropped."""
    doomed = _alerts(url, run)
    how = rng.choice(("removed", "null"))

    def change(rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            if row["seq"] in doomed or row["kind"] == "head":
                continue
            if row["kind"] == "run-start":
                payload = parse_payload(row["payload"])
                for name in ("run_key", "run_keys"):
                    if how == "removed":
                        payload.pop(name, None)
                    else:
                        payload[name] = None
                row = {**row, "payload": canonical_json(payload)}
            out.append(row)
        return out

    rewrite_stream(url, run, 0, change)
    tamper(
        url,
        ("DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = -1", (run,)),
        ("DELETE FROM trainguard_ledger_streams WHERE run_id = ? AND stream = -1", (run,)),
    )
    return f"run keys {how}, heads and run stream dropped, alerts dropped"


def cut_back_to_head(url: str, run: str, rng: random.Random) -> str:
    rows = raw_rows(url, run, 0)
    ends = [r["seq"] for r in rows if r["kind"] == "run-end"]
    heads = [r["seq"] for r in rows if r["kind"] == "head" and r["seq"] < ends[0]]
    at = rng.choice(heads)
    statements: list[tuple[str, tuple[Any, ...]]] = [
        (
            "DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = 0 AND seq > ?",
            (run, at),
        )
    ]
    if rng.random() < 0.5:
        statements.append(
            ("DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = -1", (run,))
        )
    tamper(url, *statements)
    return f"stream 0 cut back to its signed head at seq {at} ({len(statements) - 1} run stream)"


def splice(url: str, run: str, rng: random.Random) -> str:
    """Step records of another run of the same ledger spliced into stream 0, re-hashed."""
    other = raw_rows(url, f"{run}-other", 0)
    steps = [r for r in other if r["kind"] == "step"]
    first = rng.randrange(len(steps) - 2)
    piece = steps[first : first + rng.randint(1, 3)]

    def change(rows: list[Row]) -> list[Row]:
        at = rng.randint(2, len(rows) - 3)
        return rows[:at] + [{**r, "run_id": run} for r in piece] + rows[at:]

    rewrite_stream(url, run, 0, change)
    return f"{len(piece)} step record(s) of another run spliced into stream 0"


# name -> (attack, the rules one of which it must raise at high or above)
FAMILIES: dict[str, tuple[Callable[[str, str, random.Random], str], set[str]]] = {
    "rewrite_fresh_key": (rewrite_fresh_key, {"TG1213"}),
    "strip_keys": (strip_keys, {"TG1213"}),
    "cut_tail": (cut_tail, {"TG1205", "TG1211", "TG1212"}),
    "cut_back_to_head": (cut_back_to_head, {"TG1211"}),
    "splice": (splice, {"TG1206", "TG1207", "TG1203"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rewritten_history_fails_with_the_default_anchor(family: str, tmp_path: Path) -> None:
    rng = seeded()
    attack, expected = FAMILIES[family]
    url = str(tmp_path / "ledger.db")
    run = f"run-{rng.randrange(10**6)}"
    record(url, f"{run}-other")
    record(url, run, end="sabotaged")
    assert verify(url, run)[0] == 0  # honest before the attack, anchored
    done = attack(url, run, rng)
    code, document = verify(url, run)
    found = rules(document)
    assert code == 1, (done, document["findings"])
    hits = {r for r in expected if found.get(r) in ("high", "critical")}
    assert hits, (done, found)
    if family in ("rewrite_fresh_key", "strip_keys"):
        assert found["TG1213"] == "critical", (done, found)
        messages = [f["message"] for f in document["findings"] if f["rule"] == "TG1213"]
        assert any("pinned by the anchor" in m for m in messages), messages
        # Without the anchor it is the red team's evasion: the ledger alone is consistent.
        plain = rules(verify(url, run, "--no-anchors")[1])
        assert plain.get("TG1213") is None and "critical" not in plain.values(), plain


def test_a_run_recorded_unsigned_then_signed_fails(tmp_path: Path) -> None:
    url = str(tmp_path / "ledger.db")
    record(url, "plain", sign_key=False)
    assert rules(verify(url, "plain")[1]) == {"TG1210": "medium"}
    rewrite_fresh_key(url, "plain", random.Random(0))
    code, document = verify(url, "plain")
    assert code == 1 and rules(document).get("TG1213") == "critical", document["findings"]


@pytest.mark.parametrize("end", ["normal", "ctrl-c", "exception"])
def test_honest_ends_verify_clean(end: str, tmp_path: Path) -> None:
    rng = seeded()
    url = str(tmp_path / "ledger.db")
    record(url, "honest", end=end, stop=rng.randrange(1, STEPS))
    code, document = verify(url, "honest")
    assert (code, document["findings"]) == (0, [])
    assert document["anchor"] is not None and document["run_keys_pinned"] is True


# argv: ledger, at (a step, or with "timer" seconds after the first step, from another
# thread, as a scheduler's signal lands: anywhere, the guard's own hooks included).
SIGTERM_SCRIPT = """
import os, signal, sys, threading, torch
from trainguard.monitor.guard import watch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
guard = watch(model, opt, ledger=sys.argv[1], run_id="term", sign_every=4, hang_seconds=None)
at, how = float(sys.argv[2]), sys.argv[3]
child = os.fork()  # a DataLoader worker, say: it inherits the handler and the guard
if child == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(7)  # not reached: the child takes the default action, writing nothing
print("child", os.waitpid(child, 0)[1], flush=True)
kill = lambda: os.kill(os.getpid(), signal.SIGTERM)
for step in range(100000 if how == "timer" else int(at) + 5):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); guard.step(loss=loss)
    if step == 0 and how == "timer":
        threading.Timer(at, kill).start()
    if step == at and how == "step":
        kill()
print("not reached")
"""


def test_sigterm_ends_an_honest_run_cleanly(tmp_path: Path) -> None:
    rng = seeded()
    how = rng.choice(("step", "timer"))  # one subprocess per run: importing torch is slow
    at = rng.randrange(0, 12) if how == "step" else round(rng.uniform(0.0, 0.5), 3)
    url = str(tmp_path / "ledger.db")
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, url, str(at), how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Still killed by SIGTERM (what a scheduler expects), after the guard closed.
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    assert f"child {signal.SIGTERM}" in done.stdout  # killed by the signal, nothing closed
    rows = raw_rows(url, "term", 0)
    # An honest run: no alert either (a deferral must not look like the guard tampered with).
    assert [r["kind"] for r in rows if r["kind"] == "alert"] == [], (how, at)
    ends = [r for r in rows if r["kind"] == "run-end"]
    assert [parse_payload(r["payload"]).get("reason") for r in ends] == ["terminated"]
    code, document = verify(url, "term")
    assert (code, document["findings"]) == (0, []), (how, at)


def test_a_process_gone_without_close_leaves_no_unsigned_tail_past_the_time_heads(
    tmp_path: Path,
) -> None:
    """os._exit and SIGKILL run no handler: the stream stops where the process did.  Heads
    signed by time (here every step end: sign_seconds = 0, no clock in the test) leave
    nothing unauthenticated behind them; verify still says the run did not end (TG1211
    high, by design: a cut looks the same)."""
    url = str(tmp_path / "ledger.db")
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = tgw.watch(model, opt, ledger=url, run_id="gone", sign_every=1000, hang_seconds=None)
    guard.recorder.sign_seconds = 0.0  # not the module constant: that is the guard's own state
    steps = seeded().randrange(2, 12)
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
    try:
        code, document = verify(url, "gone")
        rows = raw_rows(url, "gone", 0)
    finally:
        guard.close()  # what os._exit skips; here only to leave nothing open
    assert rows[-1]["kind"] == "head" and len(rows) == 2 * (steps + 1)
    assert code == 1 and rules(document) == {"TG1211": "high"}, document["findings"]
    assert "ends at a signed head" in document["findings"][0]["message"]
