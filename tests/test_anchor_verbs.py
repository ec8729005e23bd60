"""``trainguard replay`` and ``verify-run`` pin rank 0's key from the anchor file, as
``ledger verify`` does.

Before, only ``--expect-key-id`` pinned them: a ledger rewritten whole under a fresh key
(red team 4, A1) failed ``ledger verify`` by default, yet replayed and was recomputed as
"matched", since both took the run key from the ledger itself.

Generated (seed printed; ``TRAINGUARD_TEST_SEED`` replays): which verb, and what was done
to the ledger or the anchor file.  Each rewrite must be refused (exit 1, the rule named);
``--no-anchors`` takes the key from the ledger again and says so; an honest run is matched.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from tests import verifier_train as vt
from tests.seeds import seeded
from tests.test_ledger_default_anchor import rewrite_fresh_key
from trainguard.cli.main import main
from trainguard.explain.replay.engine import epochs_from
from trainguard.ledger.anchorfile import ANCHORS_ENV
from trainguard.signing.keys import write_keypair

STEPS, EVERY = 6, 3


def _train(folder: Path, run: str, **kw: Any) -> str:
    import trainguard

    url = str(folder / "ledger.db")
    model, opt, sched, loader, epoch = vt.parts()
    step = vt.make_step(model, opt, sched)
    guard = trainguard.watch(
        model, opt, ledger=url, run_id=run, scheduler=sched, key=vt.KEY, dataloader=loader,
        hang_seconds=None, **kw,
    )  # fmt: skip
    batches = epochs_from(0, len(loader), epoch)
    with guard:
        for s in range(STEPS + 1):
            if s % EVERY == 0:
                guard.checkpoint(folder / f"{run}-{s}.pt")
            if s < STEPS:
                guard.step(loss=step(next(batches)), batch=None)
    return url


def _argv(verb: str, folder: Path, run: str, url: str) -> list[str]:
    keyfile = folder / "run.key"
    keyfile.write_text(vt.KEY.hex())
    common = ["--ledger", url, "--entry", "tests.verifier_train:build", "-o", str(folder / "out")]
    if verb == "replay":
        return ["replay", run, *common, "--key-file", str(keyfile)]
    private = folder / "verifier.pem"
    if not private.exists():
        private, _ = write_keypair(folder / "verifier")
    return [
        "verify-run", run, *common, "--key", str(private), "--run-key-file", str(keyfile),
        "--rate", "1", "--checkpoints", str(folder), "-q",
    ]  # fmt: skip


@pytest.mark.parametrize("verb", ["replay", "verify-run"])
def test_the_verbs_pin_the_anchored_key(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rnd = seeded()
    attack = rnd.choice(["fresh-key", "anchor-writable", "honest"])
    print(f"{verb}: {attack}")
    url = _train(tmp_path, "a")
    argv = _argv(verb, tmp_path, "a", url)
    capsys.readouterr()
    if attack == "fresh-key":
        rewrite_fresh_key(url, "a", random.Random(rnd.random()))
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "anchor: rank 0's run key id from the anchor" in err, err
        # Without the anchor the key is the ledger's own: the rewrite (it kept every step)
        # then replays clean, which is exactly what the pin is there to refuse.
        assert main([*argv, "--no-anchors"]) == 0
        assert "--no-anchors" in capsys.readouterr().err
        # The user's own pin wins over the anchor file: the rewritten key pinned passes.
        from trainguard.ledger import open_ledger

        ledger = open_ledger(url, create=False)
        try:
            first = next(iter(ledger.records("a", 0)))
        finally:
            ledger.close()
        assert main([*argv, "--expect-key-id", first.payload["run_key"]["key_id"]]) == 0
    elif attack == "anchor-writable":
        anchors = Path(os.environ[ANCHORS_ENV])
        anchors.chmod(0o666)  # anyone could have rewritten it: it pins nothing, and says so
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "TG1216" in err and "writable by group or others" in err, err
        assert main([*argv, "--no-anchors"]) == 0
    else:
        assert main(argv) == 0
        assert "anchor: rank 0's run key id from the anchor" in capsys.readouterr().err
    assert main([*argv, "--anchors", str(tmp_path / "nope.jsonl")]) == 2


def test_a_run_anchored_unsigned_that_now_carries_a_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A2b the other way: the run started unsigned (the anchor says so) and its stream 0
    now names a run key: the stream was rewritten whole; both verbs refuse it."""
    from trainguard.ledger.runkey import new_run_key
    from trainguard.ledger.runkey import run_key_entry as entry

    url = _train(tmp_path, "u", sign_key=False)
    from tests.test_ledger_support import rewrite_stream
    from trainguard.ledger.chain import GENESIS, canonical_json, parse_payload, record_digest

    key = new_run_key()

    def sign(rows: list[Any]) -> list[Any]:
        out: list[Any] = []
        prev = GENESIS
        for row in rows:
            row = dict(row)
            if row["kind"] == "run-start":
                payload = parse_payload(row["payload"])
                payload["run_key"] = entry(key)
                row["payload"] = canonical_json(payload)
            prev = record_digest(
                "u", 0, len(out), row["kind"], row["step"], row["wall_time"], row["payload"], prev
            )
            out.append(row)
        return out

    rewrite_stream(url, "u", 0, sign)
    for verb in ("replay", "verify-run"):
        argv = _argv(verb, tmp_path, "u", url)
        capsys.readouterr()
        assert main(argv) == 1, verb
        err = capsys.readouterr().err
        assert "TG1213" in err and "started unsigned" in err, err
