"""Sealed data through replay and the verifier: a relabelled, poisoned, swapped,
duplicated or replaced sample, or a re-seeded sampler, is named with its step, sample
index, shard and rank, at the very step it happened; an honest run matches."""

from __future__ import annotations

import random
import secrets
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from tests import data_train as dt
from trainguard.data.sealed import SealedDataset
from trainguard.explain.replay.engine import replay

RULES = {"relabel": "TG1520", "poison": "TG1520", "replace": "TG1520"}
RULES.update(swap="TG1521", duplicate="TG1521", reseed="TG1521")


def _run(
    tmp_path: Path, sabotage: str, seed: int, pass_batch: bool = True, replayed: bool = True
) -> tuple[Any, int, list[list[int]], tuple[Path, Path, Any, int]]:
    """Seal, train, and replay when ``replayed``; returns the report, the sabotaged step,
    the indices fed at each step, and the data, its public key, the entry point and the
    loaders' worker count."""
    rnd = random.Random(seed)
    data, public, total = dt.make_dataset(tmp_path, rnd)
    per_epoch = dt.steps_per_epoch(total)
    steps = 3 * per_epoch
    at = rnd.randrange(1, 2 * per_epoch)
    if sabotage == "reseed":
        at = -(-at // per_epoch) * per_epoch  # the first step of the re-seeded epoch
    # Worker processes draw a batch's indices ahead of it (the entry must use as many as
    # training: they draw their base seed from the loader's generator).
    workers = rnd.choice([0, 0, 2])
    print(f"workers: {workers}")
    fed = dt.train(tmp_path, data, public, steps, sabotage, at, rnd, pass_batch, workers)
    report = None
    entry = dt.build_for(data, public, workers)
    if replayed:
        report = replay(str(tmp_path / "ledger.db"), "run", entry, key=dt.KEY)
    return report, at, fed, (data, public, entry, workers)


def test_each_sabotage_is_named_at_its_step(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    sabotage = random.Random(seed).choice(dt.SABOTAGES)
    print(f"seed {seed}: {sabotage}")
    report, at, fed, _ = _run(tmp_path, sabotage, seed)
    chosen = fed[at]
    d = report.first_divergence
    assert d is not None and d.step == at, (seed, sabotage, at, d)
    rules = [f.rule for f in report.findings()]
    assert rules and rules[0] == RULES[sabotage], (seed, rules, d.cause)
    message = report.findings()[0].message
    assert "rank 0" in message and "shard part-" in message, (seed, message)
    if sabotage != "reseed":
        # The position the sabotage touched is named with the sample the seed put there.
        assert any(f"sample {i} " in message for i in chosen), (seed, chosen, message)


def test_honest_run_over_sealed_data_matches(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    report, _, _, _ = _run(tmp_path, "none", seed)
    assert report.verdict == "matched", report.first_divergence
    assert report.findings() == []


def test_a_loop_that_records_no_samples_is_named(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    report, _, _, _ = _run(tmp_path, "none", seed, pass_batch=False)
    d = report.first_divergence
    assert d is not None and d.step == 0
    assert [f.rule for f in report.findings()] == ["TG1523"]


def test_a_sample_poisoned_at_rest_is_named_when_replay_reads_it(tmp_path: Path) -> None:
    """Training read the shard before it changed; replay reads the sealed data and the
    sample no longer matches its seal: named at the first step that feeds it."""
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    _, _, fed, (data, public, entry, _) = _run(tmp_path, "none", seed, replayed=False)
    target = rnd.choice(fed[rnd.randrange(len(fed))])
    dataset = SealedDataset(data, public)
    k, record = dataset.manifest.locate(target)
    shard = dataset.manifest.shards[k].name
    x, y = torch.load(data / shard, weights_only=True)
    y[record] = (y[record] + 1) % 3
    torch.save((x, y), data / shard)
    report = replay(str(tmp_path / "ledger.db"), "run", entry, key=dt.KEY)
    first = next(s for s, indices in enumerate(fed) if target in indices)
    d = report.first_divergence
    assert d is not None and d.step == first, (seed, target, first, d)
    (finding,) = report.findings()
    assert finding.rule == "TG1520"
    assert f"sample {target} (shard {shard} #{record}), read by rank 0" in finding.message


def test_verify_run_alerts_name_the_sample(tmp_path: Path) -> None:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    seed = secrets.randbelow(2**32)
    sabotage = random.Random(seed).choice(dt.SABOTAGES)
    print(f"seed {seed}: {sabotage}")
    _, at, _, (_, _, entry, _) = _run(tmp_path, sabotage, seed, replayed=False)
    private, _ = write_keypair(tmp_path / "verifier")
    verifier = Verifier(
        str(tmp_path / "ledger.db"), "run", entry,
        signing_key=str(private), secret=secret_from(private.read_bytes()), rate=1.0,
        run_key=dt.KEY,
    )  # fmt: skip
    try:
        verifier.poll()
    finally:
        verifier.close()
    alert = verifier.summary.alerts[0]  # a re-seed goes on: later segments diverge too
    assert alert["rule"] == RULES[sabotage], (seed, alert)
    segment = alert["evidence"]["segment"]
    assert segment[0] <= at < segment[1] and f"step {at} " in alert["message"], (seed, alert)
    assert "rank 0" in alert["message"] and "shard part-" in alert["message"]


def test_an_entry_without_the_sealed_loader_says_samples_went_unchecked(tmp_path: Path) -> None:
    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    _, _, _, (_, _, full, _) = _run(tmp_path, "none", seed, replayed=False)

    def build(ctx: Any) -> Any:
        run = full(ctx)
        run.dataloader = None  # the entry forgot to return its loader
        return run

    report = replay(str(tmp_path / "ledger.db"), "run", build, key=dt.KEY)
    assert report.verdict == "matched"
    assert any("samples not checked" in n for s in report.segments for n in s.notes)


def test_a_run_over_other_sealed_data_is_named(tmp_path: Path) -> None:
    """A new seal of the same data (another key, another name) replays clean; the verifier's
    copy of the data with one more shard is other data: named at step 0."""
    from trainguard.data.seal import seal_dataset
    from trainguard.signing.keys import write_keypair

    seed = secrets.randbelow(2**32)
    print(f"seed {seed}")
    _, _, _, (data, _, _, workers) = _run(tmp_path, "none", seed, replayed=False)
    private, public = write_keypair(tmp_path / "other-signer")
    seal_dataset([data], private, name="the verifier's copy")
    entry = dt.build_for(data, public, workers)
    assert replay(str(tmp_path / "ledger.db"), "run", entry, key=dt.KEY).verdict == "matched"
    torch.save((torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)), data / "part-9.pt")
    seal_dataset([data], private, name="the verifier's copy")
    report = replay(str(tmp_path / "ledger.db"), "run", entry, key=dt.KEY)
    d = report.first_divergence
    assert d is not None and d.step == 0
    assert [f.rule for f in report.findings()] == ["TG1522"]


def test_a_dataset_rolled_back_to_an_older_seal_by_the_same_key_is_caught_by_its_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Generative (red team E3, the class "the seal proves who signed, not which dataset"):
    a dataset is sealed, changed (a relabel, a sample added or removed, a shard added) and
    sealed again by the same key; the folder is rolled back to the old version with its old
    seal, before the run or after it.  `data seal` prints the digest to pin; with the pin,
    data verify, SealedDataset, replay and verify-run name the older version (TG1522); an
    honest run over the pinned version matches and its verdict names the data it read."""
    import shutil

    from trainguard.cli.main import main
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.errors import VerificationError
    from trainguard.signing.keys import write_keypair

    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    when = rnd.choice(["before the run", "after the run"])
    change = rnd.choice(["relabel", "add", "remove", "shard"])
    print(f"seed {seed}: rolled back {when}; the new version: {change}")
    data, public, total = dt.make_dataset(tmp_path, rnd)
    old = tmp_path / "old"
    shutil.copytree(data, old)
    old_digest = SealedDataset(data, public).digest
    part = rnd.choice(sorted(p.name for p in data.glob("part-*.pt")))
    x, y = torch.load(data / part, weights_only=True)
    if change == "relabel":
        i = rnd.randrange(len(y))
        y[i] = (y[i] + 1) % 3
    elif change == "add":
        x, y = torch.cat([x, x[:2]]), torch.cat([y, y[:2]])
    elif change == "remove":
        x, y = x[:-2], y[:-2]
    torch.save((x, y), data / part)
    if change == "shard":
        torch.save((x[:4].clone(), y[:4].clone()), data / "part-9.pt")
    assert main(["data", "seal", str(data), "--key", str(tmp_path / "signer.pem")]) == 0
    new = capsys.readouterr().out.strip().splitlines()[-1]  # what the user pins
    assert new == SealedDataset(data, public).digest != old_digest
    rollback = lambda: (shutil.rmtree(data), shutil.copytree(old, data))  # noqa: E731

    if when == "before the run":
        rollback()
    workers = 0
    total = len(SealedDataset(data, public))
    per_epoch = dt.steps_per_epoch(total)
    dt.train(tmp_path, data, public, 2 * per_epoch, "none", 0, rnd, True, workers)
    entry = dt.build_for(data, public, workers)
    ledger = str(tmp_path / "ledger.db")
    if when == "after the run":
        honest = replay(ledger, "run", entry, key=dt.KEY, expect_data=new)
        assert honest.verdict == "matched" and honest.data == [new[:16]], honest.first_divergence
        rollback()
    read = (old_digest if when == "before the run" else new)[:16]  # as the run records it
    unpinned = replay(ledger, "run", entry, key=dt.KEY)
    assert unpinned.data == [read]  # the verdict says which data it is about
    if when == "after the run":  # the run recorded its data: the rollback after is named
        assert [f.rule for f in unpinned.findings()] == ["TG1522"], unpinned.first_divergence
    pinned = replay(ledger, "run", entry, key=dt.KEY, expect_data=new)
    d = pinned.first_divergence
    assert d is not None and d.step == 0 and "rollback" in d.cause, (seed, d)
    assert [f.rule for f in pinned.findings()] == ["TG1522"]
    # The same pin everywhere else.
    with pytest.raises(VerificationError, match="rollback"):
        SealedDataset(data, public, expect_digest=new)
    assert SealedDataset(data, public, expect_digest=old_digest).digest == old_digest
    argv = ["data", "verify", str(data), "--key", str(public), "--expect-digest", new]
    assert main(argv) == 1 and "TG1522" in capsys.readouterr().out
    private, _ = write_keypair(tmp_path / "verifier")
    verifier = Verifier(
        ledger, "run", entry, signing_key=str(private), secret=secret_from(private.read_bytes()),
        rate=1.0, run_key=dt.KEY, expect_data=new,
    )  # fmt: skip
    try:
        verifier.poll()
    finally:
        verifier.close()
    assert verifier.summary.alerts and verifier.summary.alerts[0]["rule"] == "TG1522"
    assert all(v.data == (read,) for v in verifier.summary.verdicts), verifier.summary.verdicts
