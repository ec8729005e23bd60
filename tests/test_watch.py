"""The incident, replayed on one process: each sabotage caught by its rule at its step."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests import watch_scenarios as sc  # noqa: E402
from trainguard.findings import Severity  # noqa: E402


def rules(guard: Any) -> list[tuple[str, int]]:
    """The alerts, without single medium step-time alerts: a shared test machine pauses a
    process now and then (those tests that are about time look at TG1307 themselves)."""
    return [(a.rule, a.step) for a in guard.alerts if not _pause(a)]


def _pause(alert: Any) -> bool:
    return bool(alert.rule == "TG1307" and alert.severity < Severity.HIGH)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_clean_runs_raise_no_alert(optimizer: str) -> None:
    guard = sc.run(400, optimizer=optimizer, scheduler=True)
    assert rules(guard) == []


def test_weights_changed_between_steps() -> None:
    def tamper(step: int, model: Any, opt: Any) -> None:
        if step == 120:
            with torch.no_grad():
                w = model[0].weight
                w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(10.0))  # one ulp

    guard = sc.run(200, sabotage=tamper)
    assert rules(guard) == [("TG1301", 121)]
    assert guard.alerts[0].evidence["tensors"] == ["0.weight"]


def test_optimizer_state_changed_between_steps() -> None:
    def tamper(step: int, model: Any, opt: Any) -> None:
        if step == 80:
            state = next(iter(opt.state.values()))
            state["exp_avg"].mul_(1.5)

    guard = sc.run(120, sabotage=tamper)
    assert rules(guard) == [("TG1302", 81)]


def test_reseed_mid_run() -> None:
    def reseed(step: int, model: Any, opt: Any) -> None:
        if step == 60:
            torch.manual_seed(1234)

    guard = sc.run(100, sabotage=reseed)
    assert rules(guard) == [("TG1305", 61)]


def test_learning_rate_changed_outside_scheduler() -> None:
    def bump(step: int, model: Any, opt: Any) -> None:
        if step == 70:
            opt.param_groups[0]["lr"] *= 10

    guard = sc.run(100, sabotage=bump, scheduler=True)
    assert rules(guard) == [("TG1303", 71)]


def test_optimizer_patched_at_run_time() -> None:
    original = torch.optim.AdamW.step

    def patch(step: int, model: Any, opt: Any) -> None:
        if step == 40:

            def step_fn(self: Any, *a: Any, **k: Any) -> Any:
                return original(self, *a, **k)

            torch.optim.AdamW.step = step_fn

    try:
        guard = sc.run(60, sabotage=patch)
    finally:
        torch.optim.AdamW.step = original
    assert ("TG1304", 41) in rules(guard)
    assert "AdamW.step" in guard.alerts[0].message


@pytest.mark.parametrize("world_size", [2, 8])
def test_incident_payload_fires_only_on_big_jobs(world_size: int) -> None:
    undo = sc.plant_incident_payload(world_size, threshold=4)
    try:
        guard = sc.run(300, world_size=world_size, rank=0, sync_every=0)
    finally:
        undo()
    found = {a.rule for a in guard.alerts}
    if world_size < 4:
        assert rules(guard) == []  # the small repro stays clean, as in the incident
    else:
        # Patched before the guard started: the start-up audit names the functions
        # that came from outside torch, and the behaviour gives it away at step 0 too.
        assert "TG1306" in found and "TG1307" in found
        start = [a for a in guard.alerts if a.evidence.get("at_start")]
        assert {a.rule for a in start} == {"TG1304"} and all(a.step == 0 for a in start)
        assert "clip_grad_norm_" in " ".join(a.message for a in start)
        assert ("TG1306", 0) in [(a.rule, a.step) for a in guard.alerts]


def test_stop_on_alert() -> None:
    def tamper(step: int, model: Any, opt: Any) -> None:
        if step == 10:
            with torch.no_grad():
                model[0].bias.zero_()

    with pytest.raises(sc.tgw.TrainingStopped) as err:
        sc.run(30, sabotage=tamper, on_alert="stop")
    assert err.value.alerts[0].rule == "TG1301" and err.value.alerts[0].step == 11


def test_altered_data_loader_batches() -> None:
    x, y = sc.make_data(128)

    class Shifty(torch.utils.data.Dataset[tuple[Any, Any]]):
        epoch = 0

        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            if self.epoch >= 2 and i == 7:
                return x[i] + 0.5, y[i]  # the poisoned sample, from the third epoch on
            return x[i], y[i]

    data = Shifty()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = sc.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = sc.tgw.watch(model, opt, dataloader=loader, data_check=True)
    step_of_poison = None
    for epoch in range(4):
        data.epoch = epoch
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=(xb, yb))
            if (
                step_of_poison is None
                and epoch == 2
                and any(torch.equal(row, x[7] + 0.5) for row in xb)
            ):
                step_of_poison = guard.step_index - 1
    guard.close()
    assert rules(guard) == [("TG1309", step_of_poison)]
    assert guard.alerts[0].evidence["index"] == 7


def test_ledger_records_the_run_and_verifies(tmp_path: Any) -> None:
    from trainguard.ledger import open_ledger, verify_ledger
    from trainguard.signing.keys import generate_keypair

    private, public = generate_keypair("ed25519")
    (tmp_path / "k.pem").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    url = str(tmp_path / "run.sqlite")

    def tamper(step: int, model: Any, opt: Any) -> None:
        if step == 30:
            with torch.no_grad():
                model[0].bias.add_(1.0)

    guard = sc.run(
        50,
        sabotage=tamper,
        ledger=url,
        run_id="r1",
        sign_key=str(tmp_path / "k.pem"),
        sign_every=20,
    )
    assert rules(guard) == [("TG1301", 31)]
    ledger = open_ledger(url)
    records = list(ledger.records("r1"))
    steps = [r for r in records if r.kind == "step"]
    alerts = [r for r in records if r.kind == "alert"]
    assert [r.step for r in steps] == list(range(50))
    assert len(alerts) == 1 and alerts[0].step == 31 and alerts[0].payload["rule"] == "TG1301"
    assert steps[31].payload["before"] != steps[30].payload["after"]
    assert steps[10].payload["before"] == steps[9].payload["after"]
    assert verify_ledger(ledger, "r1", str(tmp_path / "k.pub")) == []
    ledger.close()


def test_environment_differs_from_sealed_snapshot(tmp_path: Any) -> None:
    from tests.test_env_support import NAME, fresh_site
    from trainguard.cli.main import main
    from trainguard.signing.keys import generate_keypair

    private, public = generate_keypair("ecdsa-p256")
    (tmp_path / "k.pem").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    site = fresh_site(tmp_path)
    snap = tmp_path / "env.json"
    args = ["env", "snapshot", "--path", str(site), "--key", str(tmp_path / "k.pem")]
    assert main([*args, "-o", str(snap), "--no-cache", "--no-progress"]) == 0
    env = {"env_snapshot": str(snap), "env_key": str(tmp_path / "k.pub"), "env_paths": [str(site)]}
    assert sc.run(3, **env).alerts == []
    module = next(p for p in site.rglob("*.py") if NAME in str(p.parent))
    module.write_text(module.read_text() + "\nimport os  # planted\n")
    guard = sc.run(3, **env)
    assert [a.rule for a in guard.alerts] == ["TG1312"]
    assert guard.alerts[0].step == 0


def test_options_by_keyword_or_dataclass_are_the_same_and_checked_together() -> None:
    from trainguard.errors import UsageError
    from trainguard.monitor import WatchOptions

    model = sc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    by_kw = sc.tgw.watch(model, opt, every=3, min_stall_seconds=0.5, hang_seconds=None)
    by_options = sc.tgw.watch(
        model, opt, WatchOptions(every=3, min_stall_seconds=0.5, hang_seconds=None)
    )
    try:
        assert by_kw.options == by_options.options
    finally:
        by_kw.close()
        by_options.close()
    with pytest.raises(UsageError) as err:
        WatchOptions(budget=2.0, on_alert="explode", every=0)  # type: ignore[arg-type]
    assert all(w in str(err.value) for w in ("budget", "on_alert", "every"))
    with pytest.raises(UsageError, match="unknown option"):
        sc.tgw.watch(model, opt, hang_secs=3)
