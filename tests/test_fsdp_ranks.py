"""The rank verdict (monitor/ranks.py) on generated reports, without torch.distributed.

Random layouts: some labels replicated over random replica groups, some pure shards;
one random rank's bytes, code or hyper-parameters altered.  Every rank computes the
same verdict, names exactly the altered rank, and never names a pure shard's holder
for holding bytes nobody else has.  The seed is printed.
"""

from __future__ import annotations

import random

from trainguard.monitor import ranks

KEY = b"k" * 32


def layout(rng: random.Random, world: int) -> list[dict[str, object]]:
    """Replicated labels held by every rank, and row shards of ``w0..`` one per rank."""
    reports: list[dict[str, object]] = []
    replicated = {f"r{i}": f"{rng.getrandbits(64):016x}" for i in range(rng.randrange(1, 6))}
    sharded = rng.randrange(1, 4)
    for rank in range(world):
        shards = dict(replicated)
        cover = {}
        for t in range(sharded):
            label = f"w{t}[{rank}:{rank + 1}]"
            shards[label] = f"{rng.getrandbits(64):016x}"
            cover[label] = [f"w{t}", 1, world]
        reports.append(
            {
                "rank": rank,
                "step": 9,
                "world": world,
                "key": "kid",
                "hyperparameters": "hp",
                "code": {"optimizer.step": "c0", "module torch.optim.adamw": "c1"},
                "shards": shards,
                "cover": cover,
            }
        )
    return reports


def test_honest_layouts_raise_nothing() -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(50):
        world = rng.randrange(2, 33)
        verdict = ranks.judge(layout(rng, world), KEY)
        assert verdict.findings == [], (seed, verdict.findings)
        assert verdict.reporter == 0


def test_one_altered_rank_is_named_and_does_not_report() -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(50):
        world = rng.randrange(3, 33)
        reports = layout(rng, world)
        bad = rng.randrange(world)
        what = rng.choice(["bytes", "code", "hyperparameters", "step"])
        report = reports[bad]
        if what == "bytes":
            shards = report["shards"]
            assert isinstance(shards, dict)
            label = rng.choice(sorted(k for k in shards if k.startswith("r")))
            shards[label] = "0" * 16
        elif what == "code":
            report["code"] = {"optimizer.step": "patched", "module torch.optim.adamw": "c1"}
        else:
            report[what] = "other"
        verdict = ranks.judge(reports, KEY)
        named = {r for f in verdict.findings for r in f.evidence.get("ranks", [])}
        assert named == {bad}, (seed, what, verdict.findings)
        assert verdict.reporter == (1 if bad == 0 else 0)


def test_unreadable_and_forged_reports_are_named() -> None:
    reports: list[dict[str, object] | None] = list(layout(random.Random(1), 4))
    reports[2] = None  # over the bound, or not JSON
    reports[3] = {**reports[1], "rank": 1}  # type: ignore[dict-item]  # claims another rank
    verdict = ranks.judge(reports, KEY)
    assert verdict.findings[0].evidence["ranks"] == [2, 3]


def test_shards_must_cover_the_tensor() -> None:
    reports = layout(random.Random(2), 4)
    for r in reports:
        r["cover"] = {f"w[{r['rank']}:{r['rank'] + 1}]": ["w", 1, 5]}  # 4 of 5 rows held
    verdict = ranks.judge(reports, KEY)
    assert any(f.evidence.get("tensor") == "w" for f in verdict.findings), verdict.findings


def test_code_digest_is_the_same_in_two_processes() -> None:
    import subprocess
    import sys

    pytest_torch = __import__("pytest").importorskip("torch")
    del pytest_torch
    script = (
        "import torch; from trainguard.monitor import ranks;"
        "print(ranks.digest_of(ranks.code_digests("
        "torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))))"
    )
    # Both at once: each spends its time importing torch.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        )
        for seed in (1, 2)
    ]
    done = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), done
    out = {stdout for stdout, _ in done}
    assert len(out) == 1, out
