"""Signed by default: a watched run's ledger, tampered with after the fact, fails verify.

Honest runs that ``watch()`` recorded with its default settings (one rank on SQLite and
on PostgreSQL, budget mode, two DDP ranks, a DDP rank killed mid-run) verify with exit
0 through the CLI.  Then a random composition of what an insider with write access to
the database does (seed printed; ``TRAINGUARD_LEDGER_TAMPER_SEED`` replays one) is
applied to a copy, and ``trainguard ledger verify`` must exit 1 every time:

* delete alert and step records and re-hash every later record consistently (keeping
  the stale heads, dropping the heads after the edit, or dropping them all);
* cut a stream's tail at a random point (the run stream included);
* cut a stream back to an earlier signed head;
* delete a whole rank stream (with or without its row in the streams table);
* rewrite a stream's heads with a fresh key, keeping the run-start (claiming the old
  key id or naming the new one).

A rewrite of a whole stream with a new key, run-start included, cannot be seen in
the ledger alone: it fails once the key id watch logged is pinned (--expect-key-id).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from tests.test_ledger_support import (  # noqa: E402
    BACKENDS,
    Row,
    backend_url,
    raw_rows,
    rewrite_stream,
    tamper,
)
from trainguard.cli.main import main  # noqa: E402
from trainguard.ledger import open_ledger  # noqa: E402
from trainguard.ledger.heads import Statement, StreamHead, head_payload  # noqa: E402
from trainguard.ledger.runkey import new_run_key  # noqa: E402

RUN = "signed-run"
TAMPERED_AT = 40  # the honest run's one alert (TG1301) is at the step after
STEPS = 130  # past the default sign_every (100): one periodic head, then the final one
TRIALS = 8  # compositions per recorded run
_COLUMNS = ("run_id", "stream", "seq", "kind", "step", "wall_time", "payload", "prev", "digest")
INSERT = (
    "INSERT INTO trainguard_ledger_records "
    "(run_id, stream, seq, kind, step, wall_time, payload, prev, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@pytest.fixture(scope="module")
def seed() -> int:
    text = os.environ.get("TRAINGUARD_LEDGER_TAMPER_SEED")
    value = int(text) if text else random.SystemRandom().randrange(2**32)
    print(f"TRAINGUARD_LEDGER_TAMPER_SEED={value}")
    return value


def verify(url: str, *extra: str, run: str = RUN) -> tuple[int, dict[str, Any]]:
    """``trainguard ledger verify`` through the CLI: (exit code, its JSON document)."""
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    out = Path(name)
    try:
        args = ["ledger", "verify", run, "--ledger", url, "-f", "json", "-o", str(out)]
        code = main([*args, *extra])
        return code, json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def severities(document: dict[str, Any]) -> dict[str, str]:
    return {f["rule"]: f["severity"] for f in document["findings"]}


def sabotage(step: int, model: Any, opt: Any) -> None:
    if step == TAMPERED_AT:
        with torch.no_grad():
            model[0].bias.add_(0.5)


# -- copying a recorded run, and what the attacker does to the copy -----------------------
def streams_of(url: str, run: str = RUN) -> list[int]:
    with closing(open_ledger(url, create=False)) as ledger:
        return sorted({r.stream for r in ledger.records(run)})


def clone(src: str, dst: str, run: str = RUN) -> None:
    """The run's records and stream rows, copied as they are into a new ledger."""
    with closing(open_ledger(dst)) as ledger:
        ledger.runs()  # the tables are made on first use
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for stream in streams_of(src, run):
        statements.append(
            ("INSERT INTO trainguard_ledger_streams (run_id, stream) VALUES (?, ?)", (run, stream))
        )
        rows = raw_rows(src, run, stream)
        statements += [(INSERT, tuple(row[c] for c in _COLUMNS)) for row in rows]
    tamper(dst, *statements)


def _rank(rng: random.Random, streams: list[int]) -> int | None:
    ranks = [s for s in streams if s >= 0]
    return rng.choice(ranks) if ranks else None


def delete_and_rehash(url: str, run: str, rng: random.Random) -> str:
    stream = _rank(rng, streams_of(url, run))
    if stream is None:
        return "nothing to delete"
    rows = raw_rows(url, run, stream)
    candidates = [r["seq"] for r in rows if r["kind"] in ("alert", "step")]
    if not candidates:
        return "no alert or step record left"
    alerts = [r["seq"] for r in rows if r["kind"] == "alert"]
    doomed = set(alerts) | set(rng.sample(candidates, rng.randint(0, min(3, len(candidates)))))
    doomed = doomed or {rng.choice(candidates)}
    heads = rng.choice(("keep", "after", "all"))
    first = min(doomed)

    def change(rows: list[Row]) -> list[Row]:
        kept = [r for r in rows if r["seq"] not in doomed]
        if heads == "after":
            kept = [r for r in kept if r["kind"] != "head" or r["seq"] < first]
        elif heads == "all":
            kept = [r for r in kept if r["kind"] != "head"]
        return kept

    rewrite_stream(url, run, stream, change)
    return f"deleted seqs {sorted(doomed)} of stream {stream}, re-hashed, heads: {heads}"


def cut_tail(url: str, run: str, rng: random.Random) -> str:
    left = streams_of(url, run)
    if not left:
        return "no stream left"
    stream = rng.choice(left)
    rows = raw_rows(url, run, stream)
    if not rows:
        return "empty stream"
    # A rank stream keeps its run-start (a stream with nothing left is delete_stream's).
    low = 0 if stream < 0 else 1
    if len(rows) <= low:
        return f"stream {stream} too short to cut"
    at = rng.randint(low, len(rows) - 1)
    _delete_from(url, run, stream, at)
    return f"cut stream {stream} from seq {at}"


def cut_to_signed_head(url: str, run: str, rng: random.Random) -> str:
    left = streams_of(url, run)
    if not left:
        return "no stream left"
    stream = rng.choice(left)
    rows = raw_rows(url, run, stream)
    heads = [r["seq"] for r in rows if r["kind"] == "head" and r["seq"] < len(rows) - 1]
    if not heads:
        return cut_tail(url, run, rng)
    at = rng.choice(heads)
    _delete_from(url, run, stream, at + 1)
    return f"cut stream {stream} back to its signed head at seq {at}"


def _delete_from(url: str, run: str, stream: int, seq: int) -> None:
    sql = "DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = ? AND seq >= ?"
    tamper(url, (sql, (run, stream, seq)))


def delete_stream(url: str, run: str, rng: random.Random) -> str:
    stream = _rank(rng, streams_of(url, run))
    if stream is None:
        return "no rank stream left"
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("DELETE FROM trainguard_ledger_records WHERE run_id = ? AND stream = ?", (run, stream))
    ]
    row = rng.random() < 0.5
    if row:
        statements.append(
            ("DELETE FROM trainguard_ledger_streams WHERE run_id = ? AND stream = ?", (run, stream))
        )
    tamper(url, *statements)
    return f"deleted stream {stream}" + (" and its stream row" if row else "")


def fresh_key_rewrite(url: str, run: str, rng: random.Random) -> str:
    """Re-sign a stream's heads with a new key (and re-hash); the run-start kept unless asked."""
    left = streams_of(url, run)
    if not left:
        return "no stream left"
    stream = rng.choice(left)
    key = new_run_key()
    claim_old = rng.random() < 0.5
    rows = raw_rows(url, run, stream)
    if stream >= 0 and rows and rows[0]["kind"] == "run-start":
        alerts = {r["seq"] for r in rows if r["kind"] == "alert"}
    else:
        alerts = set()
    _resign(url, run, stream, key, drop=alerts, claim_old=claim_old, run_start=False)
    return (
        f"re-signed stream {stream} with a fresh key, run-start kept (alerts dropped: "
        f"{sorted(alerts)}, old key id claimed: {claim_old})"
    )


def _resign(
    url: str,
    run: str,
    stream: int,
    key: Any,
    *,
    drop: set[int],
    claim_old: bool,
    run_start: bool,
) -> None:
    from trainguard.ledger.chain import GENESIS, canonical_json, parse_payload, record_digest
    from trainguard.ledger.runkey import run_key_entry

    def change(rows: list[Row]) -> list[Row]:
        out: list[Row] = []
        prev = GENESIS
        for row in rows:
            if row["seq"] in drop:
                continue
            row = dict(row)
            payload = parse_payload(row["payload"])
            if run_start and row["kind"] == "run-start" and not out:
                payload["run_key"] = run_key_entry(key)
            if row["kind"] == "head":
                statement = Statement(run, StreamHead(stream, len(out) - 1, prev))
                if stream < 0:
                    statement = Statement(run, statement.head, _heads_now(url, run, stream))
                old = payload.get("key_id")
                payload = head_payload(statement, key)
                if claim_old and not run_start:
                    payload["key_id"] = old
            row["payload"] = canonical_json(payload)
            seq = len(out)
            prev = record_digest(
                run, stream, seq, row["kind"], row["step"], row["wall_time"], row["payload"], prev
            )
            out.append(row)
        return out

    rewrite_stream(url, run, stream, change)


def _heads_now(url: str, run: str, stream: int) -> tuple[StreamHead, ...]:
    heads = []
    for other in streams_of(url, run):
        if other != stream:
            rows = raw_rows(url, run, other)
            if rows:
                heads.append(StreamHead(other, rows[-1]["seq"], rows[-1]["digest"]))
    return tuple(heads)


TAMPERS: dict[str, Callable[[str, str, random.Random], str]] = {
    "delete_and_rehash": delete_and_rehash,
    "cut_tail": cut_tail,
    "cut_to_signed_head": cut_to_signed_head,
    "delete_stream": delete_stream,
    "fresh_key_rewrite": fresh_key_rewrite,
}


def attack(
    template: str, make_url: Callable[[], Any], seed: int, label: str, run: str = RUN
) -> None:
    """TRIALS random compositions on copies of ``template``: verify must exit 1 each time."""
    rng = random.Random(seed)
    for trial in range(TRIALS):
        names = rng.sample(sorted(TAMPERS), rng.randint(1, 3))
        with make_url() as url:
            clone(template, url, run)
            done = [TAMPERS[name](url, run, rng) for name in names]
            left = streams_of(url, run)
            code, document = verify(url, run=run) if left else (verify_gone(url, run), {})
            where = f"seed {seed} {label} trial {trial}: {done}"
            if not left:
                # No record of the run left: a finding while its stream rows say it
                # existed, else an error (no such run), never OK.
                with closing(open_ledger(url, create=False)) as ledger:
                    rows = ledger.streams(run)  # type: ignore[attr-defined]
                assert code == (1 if rows else 2), where
                continue
            assert code == 1, (where, document.get("findings"))
            assert document["intact"] is False, where


def verify_gone(url: str, run: str) -> int:
    return main(["ledger", "verify", run, "--ledger", url])


# -- single rank: SQLite and PostgreSQL --------------------------------------------------
@dataclass
class Recorded:
    url: str
    key_id: str


@pytest.fixture(scope="module", params=BACKENDS)
def recorded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Recorded]]:
    kind = request.param
    with backend_url(kind, tmp_path_factory.mktemp(f"signed-{kind}")) as url:
        guard = sc.run(STEPS, sabotage=sabotage, ledger=url, run_id=RUN)
        assert [a.rule for a in guard.alerts] == ["TG1301"]
        assert guard.recorder.key_id is not None
        yield kind, Recorded(url, guard.recorder.key_id)


@contextmanager
def _copy_url(kind: str, tmp_path: Path, counter: list[int]) -> Iterator[str]:
    counter[0] += 1
    folder = tmp_path / f"copy{counter[0]}"
    folder.mkdir()
    with backend_url(kind, folder) as url:
        yield url


def test_an_honest_run_verifies_with_default_settings(recorded: tuple[str, Recorded]) -> None:
    _, run = recorded
    code, document = verify(run.url)
    assert code == 0, document["findings"]
    assert document["findings"] == []
    assert document["run_keys"] == {"0": run.key_id}
    # The head over the run-start, the periodic one, the final one, the run head; a run
    # slower than recorder.SIGN_SECONDS (a loaded machine) also has heads signed by time.
    heads = [r for r in raw_rows(run.url, RUN, 0) if r["kind"] == "head"]
    assert document["signed_heads"] == len(heads) + 1 >= 4
    # Pinned to the key id watch logged: still intact.
    assert verify(run.url, "--expect-key-id", run.key_id[:16])[0] == 0


def test_tampering_fails_verify(recorded: tuple[str, Recorded], seed: int, tmp_path: Path) -> None:
    kind, run = recorded
    counter = [0]
    attack(run.url, lambda: _copy_url(kind, tmp_path, counter), seed, kind)


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_each_tamper_alone_fails_verify(
    recorded: tuple[str, Recorded], seed: int, tmp_path: Path, name: str
) -> None:
    kind, run = recorded
    rng = random.Random(seed)
    with _copy_url(kind, tmp_path, [0]) as url:
        clone(run.url, url)
        done = TAMPERS[name](url, RUN, rng)
        code, document = verify(url)
    assert code == 1, (seed, done, document["findings"])


def test_a_whole_rewrite_with_a_new_key_needs_the_pinned_key_id(
    recorded: tuple[str, Recorded], tmp_path: Path
) -> None:
    kind, run = recorded
    with _copy_url(kind, tmp_path, [0]) as url:
        clone(run.url, url)
        # Rank 0's stream re-signed with a new key, run-start included, alerts dropped;
        # then the run stream with that key, naming the new digests: consistent in itself.
        key = new_run_key()
        alerts = {r["seq"] for r in raw_rows(url, RUN, 0) if r["kind"] == "alert"}
        _resign(url, RUN, 0, key, drop=alerts, claim_old=False, run_start=True)
        _resign(url, RUN, -1, key, drop=set(), claim_old=False, run_start=False)
        # The limit of a ledger alone (docs/ledger.md): this rewrite verifies...
        assert verify(url)[0] == 0
        # ...until the key id that watch logged at start is pinned.
        code, document = verify(url, "--expect-key-id", run.key_id[:16])
    assert code == 1
    assert severities(document) == {"TG1213": "critical"}


def test_a_run_still_running_verifies_with_live_only(tmp_path: Path) -> None:
    url = str(tmp_path / "live.db")
    model = sc.make_model()
    x, y = sc.make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = sc.tgw.watch(model, opt, ledger=url, run_id=RUN, sign_every=5)
    for _ in range(12):
        loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
    code, document = verify(url)
    assert code == 1 and severities(document) == {"TG1211": "high", "TG1208": "info"}
    assert any("still running" in f["message"] for f in document["findings"])
    code, document = verify(url, "--live")
    assert code == 0 and severities(document)["TG1211"] == "info"
    guard.close()
    assert verify(url)[0] == 0


def test_signing_off_is_said_not_hidden(tmp_path: Path) -> None:
    url = str(tmp_path / "off.db")
    sc.run(5, ledger=url, run_id=RUN, sign_key=False)
    code, document = verify(url)
    assert code == 0 and severities(document) == {"TG1210": "medium"}
    # What the run-start says, never a cause the verifier cannot know.
    assert "run-start records say signing was off" in document["findings"][0]["message"]
    assert verify(url, "--fail-on", "medium")[0] == 1
    assert verify(url, "--expect-key-id", "0" * 16)[0] == 1  # a pin needs a key


def test_run_key_out_writes_the_private_half_once(tmp_path: Path) -> None:
    from trainguard.signing.keys import key_id, load_private_key

    url, out = str(tmp_path / "k.db"), tmp_path / "run-key-{rank}.pem"
    guard = sc.run(5, ledger=url, run_id=RUN, run_key_out=str(out))
    written = tmp_path / "run-key-0.pem"
    assert written.stat().st_mode & 0o077 == 0
    assert key_id(load_private_key(written).public_key()) == guard.recorder.key_id
    with pytest.raises(Exception, match="already exists"):
        sc.run(2, ledger=url, run_id="again", run_key_out=str(out))
    # Only the per-run key is written, and only where something is signed.
    from trainguard.errors import UsageError
    from trainguard.monitor.options import WatchOptions

    for bad in ({"sign_key": False}, {"sign_key": str(written)}, {"ledger": None}):
        with pytest.raises(UsageError, match="run_key_out"):
            WatchOptions(**{"ledger": url, "run_key_out": str(out), **bad})


def test_budget_mode_verifies(tmp_path: Path) -> None:
    url = str(tmp_path / "budget.db")
    sc.run(30, ledger=url, run_id=RUN, budget=0.05)
    code, document = verify(url)
    assert code == 0, document["findings"]


# -- two DDP ranks (gloo, CPU) --------------------------------------------------------------
def test_ddp_runs_verify_and_tampering_fails(seed: int, tmp_path: Path) -> None:
    from tests.test_watch_distributed import launch

    clean = tmp_path / "clean"
    clean.mkdir()
    launch(clean, 2, "clean")
    url = str(clean / "ledger.sqlite")
    code, document = verify(url, run="dist-run")
    assert code == 0, document["findings"]
    assert sorted(document["run_keys"]) == ["0", "1"]
    assert document["findings"] == []
    # Pinning rank 0's key is enough: its final run head vouches for rank 1's stream.
    zero, one = document["run_keys"]["0"][:16], document["run_keys"]["1"][:16]
    assert verify(url, "--expect-key-id", zero, run="dist-run")[0] == 0
    code, document = verify(url, "--expect-key-id", one, run="dist-run")
    assert code == 1 and [f["member"] for f in document["findings"]] == ["run dist-run stream 0"]
    # The tampers, on this two-rank run.
    counter = [0]
    attack(url, lambda: _copy_url("sqlite", tmp_path, counter), seed, "ddp", run="dist-run")


def test_an_honest_rank_zero_death_verifies(tmp_path: Path) -> None:
    # Rank 0 killed before its first periodic head and before any run head: its run-start,
    # signed at once, names rank 1's key, so rank 1's report explains the death.
    from tests.test_watch_distributed import launch

    launch(tmp_path, 2, "kill:0:30")
    url = str(tmp_path / "ledger.sqlite")
    plain = verify(url, run="dist-run")
    pinned = verify(url, "--expect-key-id", plain[1]["run_keys"]["0"][:16], run="dist-run")
    for code, document in (plain, pinned):
        assert code == 0, document["findings"]
        ended = [
            (f["member"], f["severity"]) for f in document["findings"] if f["rule"] == "TG1211"
        ]
        assert ended == [("run dist-run stream 0", "medium")]


# -- dead ranks, on runs written record by record (no torch needed) -----------------------
def _written_run(
    url: str, world: int, dead: dict[int, int], steps: int = 8, rule: str = "TG1311"
) -> None:
    """A run as watch writes it: rank ``r`` in ``dead`` stops after step ``dead[r]``; the
    survivors report it (TG1311) and close signed; rank 0 writes the run head."""
    from trainguard.ledger.runkey import run_key_entry

    keys = {rank: new_run_key() for rank in range(world)}
    with closing(open_ledger(url)) as ledger:
        for rank, key in keys.items():
            start = {"world_size": world, "run_key": run_key_entry(key)}
            ledger.append(RUN, "run-start", start, step=0, stream=rank)
        for step in range(steps):
            for rank, key in keys.items():
                if step <= dead.get(rank, steps):
                    ledger.append(RUN, "step", {"loss": 1.0}, step=step, stream=rank)
                    if step == 3:
                        ledger.sign_head(RUN, rank, key)
        for rank, key in keys.items():
            if rank in dead:
                continue
            for gone, last in dead.items():
                named = "stopped_rank" if rule == "TG1311" else "blocked_rank"
                alert = {"rule": rule, "evidence": {named: gone, "last_step": last}}
                ledger.append(RUN, "alert", alert, step=steps, stream=rank)
            ledger.append(RUN, "run-end", {"steps": steps}, step=steps, stream=rank)
            ledger.sign_head(RUN, rank, key)
        if 0 not in dead:
            ledger.append(RUN, "run-summary", {"world_size": world}, step=steps, stream=-1)
            ledger.sign_head(RUN, -1, keys[0])


@pytest.mark.parametrize("rule", ["TG1311", "TG1314"])
def test_a_rank_reported_dead_is_explained(tmp_path: Path, rule: str) -> None:
    url = str(tmp_path / "dead.db")
    _written_run(url, 3, {2: 5}, rule=rule)
    code, document = verify(url)
    assert code == 0, document["findings"]
    found = [f for f in document["findings"] if f["rule"] != "TG1208"]
    assert [(f["rule"], f["severity"]) for f in found] == [("TG1211", "medium")]
    assert "rank 2 died" in found[0]["message"] and "after step 5" in found[0]["message"]


def test_a_dead_rank_cut_short_of_what_its_peer_saw_fails(tmp_path: Path) -> None:
    url = str(tmp_path / "dead.db")
    _written_run(url, 2, {1: 6})
    rows = raw_rows(url, RUN, 1)
    cut = next(r["seq"] for r in rows if r["kind"] == "step" and r["step"] == 5)
    tamper(url, ("DELETE FROM trainguard_ledger_records WHERE stream = 1 AND seq >= ?", (cut,)))
    code, document = verify(url)
    assert code == 1 and severities(document)["TG1211"] == "high"
    assert any("its tail was cut" in f["message"] for f in document["findings"])


def test_a_death_reported_by_a_cut_stream_explains_nothing(tmp_path: Path) -> None:
    # The survivor's own end was cut: its alert is not covered by its final head.
    url = str(tmp_path / "dead.db")
    _written_run(url, 2, {1: 6})
    last = raw_rows(url, RUN, 0)[-1]["seq"]
    tamper(url, ("DELETE FROM trainguard_ledger_records WHERE stream = 0 AND seq = ?", (last,)))
    code, document = verify(url)
    assert code == 1
    ended = {(f["member"], f["severity"]) for f in document["findings"] if f["rule"] == "TG1211"}
    assert (f"run {RUN} stream 1", "high") in ended


def test_a_key_id_too_short_to_pin_is_a_usage_error(tmp_path: Path) -> None:
    url = str(tmp_path / "k.db")
    _written_run(url, 1, {})
    assert main(["ledger", "verify", RUN, "--ledger", url, "--expect-key-id", "abc"]) == 2
    assert verify(url, "--expect-key-id", "f" * 16)[0] == 1
