"""``trainguard verify-run``: a verifier beside a training process names sabotage that starts
mid-run, within one checkpoint interval, and signs its verdicts with its own key."""

from __future__ import annotations

import random
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from tests import verifier_train as vt
from trainguard.explain.verifier.follow import Verdict, Verifier
from trainguard.explain.verifier.sampling import (
    chosen,
    detection_probability,
    secret_from,
)
from trainguard.ledger import open_ledger, verify_ledger
from trainguard.signing.keys import write_keypair

ROOT = Path(__file__).resolve().parents[1]


def _start_training(folder: Path, run_id: str, sabotage: str, start: int) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.verifier_train", str(folder), run_id, sabotage, str(start)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _verifier(
    folder: Path, run_id: str, rate: float, checkpoints: Path | None = None
) -> tuple[Verifier, Path]:
    private, public = write_keypair(folder / "verifier")
    verifier = Verifier(
        str(folder / "ledger.db"),
        run_id,
        vt.build,
        signing_key=str(private),
        secret=secret_from(private.read_bytes()),
        rate=rate,
        run_key=vt.KEY,
        checkpoint_dir=str(checkpoints) if checkpoints else None,
    )
    return verifier, public


def _wait_for_ledger(folder: Path, proc: Any) -> None:
    import time

    while not (folder / "ledger.db").exists() and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        _, err = proc.communicate()
        raise AssertionError(f"training exited {proc.returncode}: {err[-2000:]}")


def _train_to_the_end(folder: Path, run_id: str) -> None:
    proc = _start_training(folder, run_id, "none", 0)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One honest run, trained once; tests work on copies of its folder."""
    folder = tmp_path_factory.mktemp("finished")
    _train_to_the_end(folder, "honest")
    return folder


def _copy_of(finished: Path, tmp_path: Path) -> Path:
    """The run's ledger and checkpoints in ``tmp_path/run`` (the records keep the original
    paths: pass the copy as the checkpoint folder)."""
    import shutil

    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_follow_catches_sabotage_starting_mid_run(tmp_path: Path) -> None:
    """Generative: a random sabotage from a random step; the verifier follows the run."""
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    sabotage = rnd.choice(["labels", "lr", "grads", "reseed"])
    start = rnd.randrange(8, 30)
    print(f"seed {seed}: {sabotage} from step {start}")
    proc = _start_training(tmp_path, "run", sabotage, start)
    _wait_for_ledger(tmp_path, proc)
    verifier, public = _verifier(tmp_path, "run", rate=1.0)
    alive: list[tuple[Verdict, bool]] = []
    try:
        summary = verifier.follow(
            timeout=300,
            poll_seconds=0.2,
            on_verdict=lambda v: alive.append((v, proc.poll() is None)),
        )
    finally:
        verifier.close()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    bad = [(v, running) for v, running in alive if v.status != "matched"]
    assert bad, (seed, alive)
    first, running = bad[0]
    assert running, "the verdict came after training ended"
    assert first.status == "diverged", (seed, first)
    # Within one checkpoint interval of the first sabotaged step (a re-seed after step
    # `start` is carried by the checkpoint that follows it).
    began = start + 1 if sabotage == "reseed" else start
    assert first.start <= began < first.end or (sabotage == "reseed" and first.end == began)
    assert first.ranks == (0,)
    # Every segment that ends before the sabotage matched (a re-seed may be named by the
    # segment whose closing checkpoint carries it, the one ending at `began`).
    clean_until = began - 1 if sabotage == "reseed" else began
    assert all(v.status == "matched" for v, _ in alive if v.end <= clean_until), (seed, alive)
    assert summary.finished and summary.exit_code() == 1
    # The verdicts are a chain of their own, every record covered by the verifier's key.
    with open_ledger(str(tmp_path / "ledger.db")) as ledger:
        kinds = [r.kind for r in ledger.records("run/verify")]
        assert kinds.count("verdict") == len(alive) and "alert" in kinds
        assert verify_ledger(ledger, "run/verify", str(public)) == []


def test_honest_run_matches_and_reports_detection(finished: Path, tmp_path: Path) -> None:
    folder = _copy_of(finished, tmp_path)
    verifier, _ = _verifier(folder, "honest", rate=0.5, checkpoints=folder)
    try:
        summary = verifier.follow(timeout=120, poll_seconds=0.1)
    finally:
        verifier.close()
    assert summary.finished and summary.segments_seen == vt.STEPS // vt.EVERY
    assert all(v.status == "matched" for v in summary.verdicts) and summary.exit_code() == 0
    assert summary.alerts == []
    # Each verdict says how far a verified signed head covered the run when it was made.
    assert all(v.signed_through is not None for v in summary.verdicts)
    # The picked segments are the secret's choice, not a pattern training could follow.
    picked = {v.start for v in summary.verdicts}
    assert picked == {
        a for a in range(0, vt.STEPS, vt.EVERY) if chosen(verifier.secret, "honest", a, 0.5)
    }
    assert summary.detection == pytest.approx(1 - 0.5 ** (0.1 * summary.segments_seen))


def test_unrecorded_checkpoint_is_an_alert(finished: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    folder = _copy_of(finished, tmp_path)
    shutil.copy(folder / "honest-10.pt", folder / "honest-10-copy.pt")  # same bytes: recorded
    torch.save({"epoch": 3}, folder / "notes.pt")  # not a trainguard checkpoint: left alone
    state = torch.load(folder / "honest-10.pt", weights_only=True)
    state["scheduler"]["gamma"] = 0.95
    torch.save(state, folder / "honest-10-edited.pt")
    verifier, _ = _verifier(folder, "honest", rate=0.01, checkpoints=folder)
    try:
        verifier.poll()
        assert verifier.summary.alerts == []  # a file is looked at on the second sighting
        verifier.poll()
    finally:
        verifier.close()
    alerts = verifier.summary.alerts
    assert [a["evidence"]["file"] for a in alerts] == [str(folder / "honest-10-edited.pt")]
    assert "no ledger record names" in alerts[0]["message"]


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_keyed_sampling_rate(rate: float) -> None:
    secret = secret_from(secrets.token_bytes(32))
    n = 4000
    hits = sum(chosen(secret, "r", a, rate) for a in range(0, 10 * n, 10))
    # Binomial(n, rate): six standard deviations either way.
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(hits - n * rate) < 6 * sd
    other = secret_from(secrets.token_bytes(32))
    assert [chosen(secret, "r", a, rate) for a in range(200)] != [
        chosen(other, "r", a, rate) for a in range(200)
    ]
    assert detection_probability(rate, 1.0, 1) == pytest.approx(rate)
    assert detection_probability(rate, 0.5, 20) == pytest.approx(1 - (1 - rate) ** 10)


def test_cli(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from trainguard.cli.main import main

    folder = _copy_of(finished, tmp_path)
    private, _ = write_keypair(tmp_path / "verifier")
    run_key = tmp_path / "run.key"
    run_key.write_text(vt.KEY.hex())
    argv = ["verify-run", "honest", "--ledger", str(folder / "ledger.db"), "--entry",
            "tests.verifier_train:build", "--key", str(private), "--run-key-file", str(run_key),
            "--rate", "1", "--checkpoints", str(folder), "-q"]  # fmt: skip
    assert main([*argv, "-f", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments_seen"] == len(out["verdicts"]) == vt.STEPS // vt.EVERY
    assert {v["status"] for v in out["verdicts"]} == {"matched"}
    # A checkpoint edited at rest: the segment from it does not recompute (exit 1).
    path = folder / "honest-20.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert main([*argv, "--key", str(write_keypair(tmp_path / "v2")[0])]) == 1
    text = capsys.readouterr().out
    assert "steps 20..24: DIVERGED at 20 (rank 0)" in text and "TG1511" in text


def test_cli_imports_the_entry_from_a_sealed_copy(
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from trainguard.cli.main import main
    from trainguard.signing import seal

    folder = _copy_of(finished, tmp_path)
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(ROOT / "tests" / "verifier_train.py", code / "sealed_train.py")
    signer, public = write_keypair(tmp_path / "code-signer")
    seal(code, str(signer), cache=False)
    private, _ = write_keypair(tmp_path / "verifier")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    argv = ["verify-run", "honest", "--ledger", str(folder / "ledger.db"), "--entry",
            "sealed_train:build", "--key", str(private), "--rate", "0.3", "--code", str(code),
            "--code-key", str(public), "-q"]  # fmt: skip
    code_ = main(argv)
    assert code_ == 0, capsys.readouterr().out
    assert "sealed_train" in sys.modules
    sys.modules.pop("sealed_train")
    source = code / "sealed_train.py"
    source.write_text(source.read_text().replace("yb.flip(0)", "yb.flip(0) * 1.0"))
    assert main(argv) == 1
    assert "does not verify" in capsys.readouterr().err


def test_checkpoints_of_rank_0_only_are_reported_not_skipped(tmp_path: Path) -> None:
    """A data-parallel run whose other ranks saved no checkpoints: nothing can be recomputed,
    and the verifier says so (exit 2) instead of reading as clean."""
    ledger = open_ledger(str(tmp_path / "ledger.db"))
    ledger.append("dp", "run-start", {"world_size": 2}, step=0, stream=0)
    ledger.append("dp", "run-start", {"world_size": 2}, step=0, stream=1)
    for step in range(11):
        if step % 5 == 0:  # recorded right after the steps it follows, as the guard does
            record = {"step": step, "blake3": f"{step:064x}", "path": "", "name": f"c{step}.pt"}
            ledger.append("dp", "checkpoint", record, step=step, stream=0)
        for rank in (0, 1):
            if step < 10:
                ledger.append("dp", "step", {}, step=step, stream=rank)
    for rank in (0, 1):
        ledger.append("dp", "run-end", {"steps": 10}, step=10, stream=rank)
    ledger.close()
    verifier, _ = _verifier(tmp_path, "dp", rate=1.0)
    try:
        summary = verifier.follow(timeout=30, poll_seconds=0.05)
    finally:
        verifier.close()
    # No pair of checkpoints every rank saved: the only segment is the whole run from the
    # entry's fresh build, which this test's entry (no module:function) cannot replay.
    assert [(v.start, v.end, v.status) for v in summary.verdicts] == [(0, 10, "error")]
    assert summary.problems and "0, 5, 10" in summary.problems[0]
    assert summary.alerts == [] and summary.exit_code() == 2


def test_each_record_is_read_once_and_recomputations_read_none(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polls read only what is new (per stream, after the last seq read); a recomputation
    replays from the verifier's own history instead of re-reading the ledger; only the
    run's end verifies the whole ledger once (its signed heads)."""
    import trainguard.ledger as ledger_pkg

    folder = _copy_of(finished, tmp_path)
    verifier, _ = _verifier(folder, "honest", rate=0.5, checkpoints=folder)
    reads: list[tuple[int, int]] = []
    whole: list[int] = []
    store = verifier.store
    original = store.records
    real_verify = ledger_pkg.verify_ledger

    def counting(*args: Any, **kwargs: Any) -> Any:
        for r in original(*args, **kwargs):
            if not whole or whole[-1] == 0:
                reads.append((r.stream, r.seq))
            yield r

    def verify(*args: Any, **kwargs: Any) -> Any:
        whole.append(1)
        try:
            return real_verify(*args, **kwargs)
        finally:
            whole.append(0)

    monkeypatch.setattr(store, "records", counting)
    monkeypatch.setattr(ledger_pkg, "verify_ledger", verify)
    try:
        for _ in range(3):
            verifier.poll()
    finally:
        verifier.close()
    summary = verifier.summary
    assert summary.finished and summary.verdicts and summary.exit_code() == 0
    assert whole == [1, 0]  # the whole-run check, once
    run_records = [
        (r.stream, r.seq)
        for r in open_ledger(str(folder / "ledger.db"), create=False).records("honest")
    ]
    assert sorted(reads) == sorted(run_records)  # every record once, none again


@pytest.mark.parametrize("edit", ["time", "delete", "swap"])
def test_an_edited_ledger_is_not_recomputed(finished: Path, tmp_path: Path, edit: str) -> None:
    """Fail closed: a record edited, deleted or moved breaks the chain the verifier checks as
    it reads; every verdict is an error naming it, never a match."""
    from tests.test_ledger_support import tamper

    folder = _copy_of(finished, tmp_path)
    url = str(folder / "ledger.db")
    seed = secrets.randbelow(2**32)
    seq = random.Random(seed).randrange(2, 30)
    print(f"seed {seed}: {edit} at stream 0 seq {seq}")
    statements = {
        "time": [("UPDATE trainguard_ledger_records SET wall_time = wall_time + 1"
                  " WHERE run_id = 'honest' AND stream = 0 AND seq = ?", (seq,))],
        "delete": [("DELETE FROM trainguard_ledger_records"
                    " WHERE run_id = 'honest' AND stream = 0 AND seq = ?", (seq,))],
        "swap": [  # two records trade places
            ("UPDATE trainguard_ledger_records SET seq = -5"
             " WHERE run_id = 'honest' AND stream = 0 AND seq = ?", (seq,)),
            ("UPDATE trainguard_ledger_records SET seq = ?"
             " WHERE run_id = 'honest' AND stream = 0 AND seq = ?", (seq, seq + 1)),
            ("UPDATE trainguard_ledger_records SET seq = ?"
             " WHERE run_id = 'honest' AND stream = 0 AND seq = -5", (seq + 1,)),
        ],
    }  # fmt: skip
    tamper(url, *statements[edit])
    verifier, _ = _verifier(folder, "honest", rate=1.0, checkpoints=folder)
    try:
        verifier.poll()
    finally:
        verifier.close()
    summary = verifier.summary
    assert summary.verdicts and {v.status for v in summary.verdicts} == {"error"}
    assert all("does not verify" in v.cause for v in summary.verdicts)
    assert summary.exit_code() != 0


@pytest.mark.parametrize("attack", ["edit", "delete", "pin"])
def test_a_rehashed_or_rekeyed_history_is_refused_before_any_recomputation(
    finished: Path, tmp_path: Path, attack: str
) -> None:
    """Generative: a step record of rank 0 edited or deleted at random and the stream
    re-hashed so every link holds (only its signed heads can tell), or the run key pinned
    to another id. The verifier checks each signed head as it reads it: no segment is
    recomputed on that history, and an alert in its own chain names the ledger rule."""
    import re

    from tests.seeds import seeded
    from tests.test_ledger_support import Row, rewrite_stream

    rnd = seeded()
    folder = _copy_of(finished, tmp_path)
    url = str(folder / "ledger.db")
    pins = None
    if attack == "pin":
        pins = [f"{rnd.getrandbits(64):016x}"]
    else:
        steps = [r.seq for r in open_ledger(url, create=False).records("honest", 0)
                 if r.kind == "step"]  # fmt: skip
        seq = rnd.choice(steps)
        print(attack, "stream 0 seq", seq)

        def change(rows: list[Row]) -> list[Row]:
            if attack == "delete":
                return [r for r in rows if r["seq"] != seq]
            return [{**r, "payload": re.sub(r'"loss":[-0-9.eE+]+', '"loss":0.5', r["payload"])}
                    if r["seq"] == seq else r for r in rows]  # fmt: skip

        rewrite_stream(url, "honest", 0, change)
    private, _ = write_keypair(folder / "verifier")
    verifier = Verifier(url, "honest", vt.build, signing_key=str(private),
                        secret=secret_from(private.read_bytes()), rate=1.0, run_key=vt.KEY,
                        checkpoint_dir=str(folder), expect_key_ids=pins)  # fmt: skip
    try:
        verifier.poll()
        verifier.poll()
    finally:
        verifier.close()
    summary = verifier.summary
    assert summary.verdicts and {v.status for v in summary.verdicts} == {"error"}
    # An edit breaks the digest a head signed; a deletion moves the heads after it to seqs
    # they did not sign. (A deleted step may also be a TG1513 gap: other alerts may follow.)
    expected = {"pin": {"TG1213"}, "edit": {"TG1206"}, "delete": {"TG1206", "TG1207"}}[attack]
    ledger_alerts = [a for a in summary.alerts if a["rule"].startswith("TG12")]
    assert len(ledger_alerts) == 1 and ledger_alerts[0]["rule"] in expected, summary.alerts
    assert "no segment is recomputed" in ledger_alerts[0]["message"]
    assert summary.exit_code() == 1
    ledger = open_ledger(url, create=False)
    try:
        written = [r.payload["rule"] for r in ledger.records("honest/verify") if r.kind == "alert"]
    finally:
        ledger.close()
    assert ledger_alerts[0]["rule"] in written
