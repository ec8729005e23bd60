"""Red team class A (2026-12-04, /work/tmp/redteam_watch: buffer_tamper.py, module_config.py):
training state the fingerprints do not cover.  A buffer a forward reads (nanoGPT's causal
mask, BatchNorm's statistics, a rotary table) edited between steps, and a module's own
settings (Dropout.p, LayerNorm.eps, the training flag, a submodule) changed mid-run, both
went unseen.

Generated: the model (nanoGPT-like, BatchNorm, rotary cache grown in forward), exact or
budget mode, gradient accumulation, evaluation passes between steps, a declared change,
and the attack (which buffer or setting, how it is written, at which step).  Honest runs
stay below high; each attack is named at the step after it.  Seed printed; rerun one with
TRAINGUARD_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from tests.outside_models import MODELS, VOCAB, batch  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402

STEPS = 10
Attack = Callable[[Any], None]


def train(
    rng: random.Random,
    kind: str,
    *,
    budget: float | None,
    accumulate: int,
    eval_every: int,
    attack: tuple[int, Attack] | None = None,
    declare: tuple[int, str, Any] | None = None,
) -> Any:
    torch.manual_seed(rng.randrange(2**31))
    model = MODELS[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kw: dict[str, Any] = {"ledger": None, "hang_seconds": None, "min_stall_seconds": 5.0}
    if budget is not None:
        kw["budget"] = budget
    guard = tgw.watch(model, opt, **kw)
    for step in range(STEPS):
        for _ in range(accumulate):
            x, y = batch(rng, kind, step)
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            (loss / accumulate).backward()
        opt.step()
        opt.zero_grad()
        changed = None
        if declare is not None and step == declare[0]:
            changed = {declare[1]: declare[2]}
        guard.step(loss=loss, changed=changed)
        if eval_every and step % eval_every == 0:  # an honest evaluation pass
            model.eval()
            with torch.no_grad():
                model(batch(rng, kind, step)[0])
            model.train()
        if attack is not None and step == attack[0]:
            attack[1](model)
        if declare is not None and step + 1 == declare[0]:
            _set(model, declare[1], declare[2])  # made before the step that declares it
    guard.close()
    return guard


def _set(model: Any, name: str, value: Any) -> None:
    path, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(path), attr, value)


def high(guard: Any) -> list[Any]:
    return [a for a in guard.alerts if a.severity >= Severity.HIGH]


def setup(rng: random.Random) -> dict[str, Any]:
    return {
        "kind": rng.choice(sorted(MODELS)),
        "budget": rng.choice([None, None, 0.05]),
        "accumulate": rng.choice([1, 1, 2]),
        "eval_every": rng.choice([0, 2, 3]),
    }


# -- buffers ----------------------------------------------------------------------------------
def buffer_attack(rng: random.Random, model: Any, exact: bool) -> tuple[str, str, Attack]:
    names = [n for n, _ in model.named_buffers()] + ["rotary.cos_cached"] * (
        hasattr(model, "rotary")
    )
    name = rng.choice(sorted(set(names)))
    # Writes that bypass the version counter are seen by the full fingerprints only,
    # which budget mode takes at a keyed share of the steps.
    how = rng.choice(
        ["in place", "replace", ".data", "numpy"] if exact else ["in place", "replace"]
    )

    def attack(m: Any) -> None:
        path, attr = name.rsplit(".", 1) if "." in name else ("", name)
        owner = m.get_submodule(path)
        buf = getattr(owner, attr)
        with torch.no_grad():
            if how == "in place":
                buf.add_(1)
            elif how == "replace":
                setattr(owner, attr, buf.clone() + 1)
            elif how == ".data":
                buf.data.add_(1)
            else:
                buf.numpy()[...] += 1

    return name, how, attack


def test_buffers_edited_between_steps_are_named_at_the_next_step() -> None:
    rng = seeded()
    for _ in range(3):
        cfg = setup(rng)
        state = rng.getstate()
        honest = train(rng, **cfg)
        assert high(honest) == [], (cfg, honest.alerts)
        rng.setstate(state)
        at = random.Random(rng.random()).randrange(1, STEPS - 2)
        probe = MODELS[cfg["kind"]]()
        probe(batch(random.Random(0), cfg["kind"], STEPS)[0])  # caches exist
        name, how, attack = buffer_attack(random.Random(at), probe, cfg["budget"] is None)
        rng.setstate(state)
        guard = train(rng, **cfg, attack=(at, attack))
        found = [a for a in guard.alerts if a.rule == "TG1317"]
        print(cfg, name, how, at, [(a.step, a.message) for a in found])
        assert found and found[0].step == at + 1, (cfg, name, how, guard.alerts)
        assert found[0].severity == Severity.CRITICAL and name in found[0].message


# -- module settings --------------------------------------------------------------------------
def setting_attack(rng: random.Random, model: Any) -> tuple[str, Attack]:
    """A public setting of some module changed, a submodule swapped, or model.eval()."""
    torch_nn = torch.nn
    choices: list[tuple[str, Attack]] = [("training", lambda m: m.eval())]
    for mname, mod in model.named_modules():
        if isinstance(mod, torch_nn.Dropout):
            choices.append((f"{mname}.p", lambda m, n=mname: setattr(m.get_submodule(n), "p", 0.0)))
            parent, _, child = mname.rpartition(".")
            choices.append(
                (
                    f"{mname}",
                    lambda m, p=parent, c=child: setattr(
                        m.get_submodule(p), c, torch_nn.Identity()
                    ),
                )
            )
        if isinstance(mod, (torch_nn.LayerNorm, torch_nn.BatchNorm1d)):
            choices.append(
                (f"{mname}.eps", lambda m, n=mname: setattr(m.get_submodule(n), "eps", 10.0))
            )
        if isinstance(mod, torch_nn.BatchNorm1d):
            choices.append(
                (
                    f"{mname}.momentum",
                    lambda m, n=mname: setattr(m.get_submodule(n), "momentum", 0.9),
                )
            )
        if isinstance(mod, torch_nn.GELU):
            choices.append(
                (
                    f"{mname}.approximate",
                    lambda m, n=mname: setattr(m.get_submodule(n), "approximate", "tanh"),
                )
            )
        if hasattr(mod, "n_head"):
            choices.append(
                (f"{mname}.n_head", lambda m, n=mname: setattr(m.get_submodule(n), "n_head", 1))
            )
    return rng.choice(choices)


def test_module_settings_changed_between_steps_are_named_and_declared_ones_are_not() -> None:
    rng = seeded()
    for _ in range(2):
        cfg = setup(rng)
        state = rng.getstate()
        at = random.Random(rng.random()).randrange(1, STEPS - 2)
        probe = MODELS[cfg["kind"]]()
        name, attack = setting_attack(random.Random(at), probe)
        rng.setstate(state)
        guard = train(rng, **cfg, attack=(at, attack))
        found = [a for a in guard.alerts if a.rule == "TG1318"]
        print(cfg, name, at, [(a.step, a.message) for a in found])
        assert found and found[0].step == at + 1, (cfg, name, guard.alerts)
        assert found[0].severity == Severity.HIGH
        shown = name.rsplit(".", 1)[-1] if name != "training" else "training"
        assert shown in found[0].message, found[0].message
        # The same kind of change, declared with guard.step(changed=...): silent.
        declarable = [
            (n, v)
            for n, v in (
                ("drop.p", 0.0),
                ("bn.momentum", 0.5),
                ("bn.training", False),  # BatchNorm frozen from here on
                ("h.0.ln_1.eps", 1e-3),
            )
            if _has(probe, n)
            # model.train() after an evaluation pass would undo a frozen BatchNorm here
            and not (n.endswith(".training") and cfg["eval_every"])
        ]
        if declarable:
            dname, value = rng.choice(declarable)
            rng.setstate(state)
            quiet = train(rng, **cfg, declare=(at + 1, dname, value))
            assert high(quiet) == [], (cfg, dname, quiet.alerts)
            assert any(a.rule == "TG1316" and dname in a.message for a in quiet.alerts)


def _has(model: Any, name: str) -> bool:
    path, attr = name.rsplit(".", 1)
    try:
        return hasattr(model.get_submodule(path), attr)
    except AttributeError:
        return False


def test_a_compiled_model_is_watched_through_its_wrapper_with_fullgraph_too() -> None:
    """torch.compile traces the model's hooks (they do nothing there); the guard hooks the
    compiled wrapper, which runs in eager Python, once it sees no forward of its own."""
    rng = seeded()
    model = MODELS["norm"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = tgw.watch(model, opt, ledger=None, hang_seconds=None, min_stall_seconds=30.0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=rng.random() < 0.5)
    at = rng.randrange(3, 6)
    for step in range(8):
        x, y = batch(rng, "norm", step)
        loss = torch.nn.functional.cross_entropy(compiled(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
        if step == at:
            with torch.no_grad():
                model.bn.running_var.mul_(4.0)
    guard.close()
    found = [a for a in guard.alerts if a.severity >= Severity.HIGH]
    assert [(a.rule, a.step) for a in found] == [("TG1317", at + 1)], guard.alerts


class Synced(torch.nn.Module):
    """DistributedDataParallel's shape: a public flag the loop flips around micro-steps."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(4, 1)
        self.require_backward_grad_sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_flag_the_loop_toggles_from_the_start_is_quiet_and_one_flipped_once_is_not() -> None:
    rng = seeded()
    micro = rng.randrange(2, 4)
    flip_at = rng.randrange(0, 3)  # inside the warm-up: judged when it ends
    for toggle in (True, False):
        m = Synced()
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        guard = tgw.watch(m, opt, ledger=None, hang_seconds=None, min_stall_seconds=30.0)
        for step in range(8):
            for i in range(micro):
                if toggle:  # no_sync() on all but the last micro-step
                    m.require_backward_grad_sync = i == micro - 1
                elif step == flip_at and i == 0:
                    m.module.flag = False  # a new public setting...
                    m.require_backward_grad_sync = False  # ...and a flag flipped for good
                m(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            guard.step()
        guard.close()
        found = [a for a in guard.alerts if a.rule == "TG1318"]
        if toggle:
            assert found == [], guard.alerts
        else:
            assert any("require_backward_grad_sync" in a.message for a in found), guard.alerts
            assert any("flag" in a.message and a.step == flip_at for a in found), guard.alerts
