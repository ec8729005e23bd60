"""``trainguard demo``: the 2024 training-sabotage incident, played end to end on the CPU.

Seven acts, each the real command a user would run, on files and a training
run the demo makes in a temporary folder (harmless payloads: a planted file
would only create a canary file, and none is ever loaded outside
``protect()``):

1. scan      a shared checkpoint store with planted files
2. protect   a colleague loads a planted checkpoint anyway
3. env       the cluster's optimizer code is edited (and its RECORD rewritten)
4. watch     a training run is sabotaged the way the incident describes
5. replay    which step stopped being honest
6. diff      a published checkpoint edited at rest: which tensors
7. report    the run's story as one offline HTML page

Every verdict printed is computed from the tools' own output; the demo exits 0
only if each act caught what it planted and flagged nothing clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ACTS = ("scan", "protect", "env", "watch", "replay", "diff", "report")
_RULE = "=" * 100


def _show(text: str) -> None:
    print(text, flush=True)


def _heading(number: int, title: str) -> None:
    _show(f"\n{_RULE}\n{number}. {title}\n{_RULE}")


def _trainguard(
    args: list[str], cwd: Path, *, max_lines: int = 40, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``trainguard ARGS`` as a user would and show its output (trimmed)."""
    _show("$ trainguard " + " ".join(args))
    proc = subprocess.run(
        # -I: the work folder (cwd) is not on the path, so nothing in it can shadow a module.
        [sys.executable, "-I", "-m", "trainguard", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = (proc.stdout + proc.stderr).rstrip("\n").splitlines()
    shown = lines[:max_lines]
    _show("\n".join(shown))
    if len(lines) > max_lines:
        _show(f"  ... ({len(lines) - max_lines} more lines)")
    _show(f"[exit {proc.returncode}]")
    return proc


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _act_protect(work: Path) -> bool:
    from trainguard.samples import MALICIOUS

    incoming = work / "incoming"
    incoming.mkdir()
    canary = work / "canary-protect"
    planted = Path(MALICIOUS["torch-save-reduce"].build(incoming, canary))
    target = planted.with_name("finetune-v2.pt")
    planted.rename(target)
    _show(
        "A new checkpoint arrives (a torch.save file whose pickle calls os.system). The "
        "job loads it\nwith torch.load(weights_only=False), as many training scripts do, "
        "after trainguard.protect():\n"
    )
    code = (
        "import trainguard, torch\n"
        "trainguard.protect()\n"
        f"torch.load({json.dumps(str(target.relative_to(work)))}, weights_only=False)\n"
    )
    _show("$ python -c '" + code.replace("\n", "; ").rstrip("; ") + "'")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=work, capture_output=True, text=True, timeout=300
    )
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["(no error)"]
    _show(last[0][:400])
    refused = proc.returncode != 0 and "UnsafeModelError" in proc.stderr
    ran = canary.exists()
    if ran:
        _show("\n=> the payload RAN (the canary file exists)")
    else:
        verdict = "refused before any of its code ran" if refused else "NOT refused"
        _show(f"\n=> {verdict}; the payload did not run (no canary file).")
    return refused and not ran


def _act_env(work: Path) -> bool:
    from trainguard.demo import environment

    site = work / "site-packages"
    environment.install(site)
    _show(
        f"The cluster's shared environment holds {environment.NAME} {environment.VERSION}, "
        "whose clip.py every job imports.\nThe platform team sealed a snapshot of it when "
        "it was installed:\n"
    )
    _trainguard(["keygen", "-o", "ops"], work, max_lines=2)
    snap = _trainguard(
        ["env", "snapshot", "--path", "site-packages", "--key", "ops.pem", "-o", "env.snapshot",
         "--no-cache", "--no-progress"],
        work, max_lines=4,
    )  # fmt: skip
    environment.tamper(site)
    _show(
        "\nThe attacker edits clusteropt/clip.py (gradients flip on jobs of 256+ GPUs) and "
        "rewrites\nits RECORD line so that the installer's hashes agree. A RECORD check "
        "alone is fooled:\n"
    )
    plain = _trainguard(
        ["env", "verify", "--path", "site-packages", "--no-cache", "--no-progress"], work,
        max_lines=4,
    )  # fmt: skip
    _show("\nAgainst the signed snapshot it is not:\n")
    sealed = _trainguard(
        ["env", "verify", "--path", "site-packages", "--against", "env.snapshot",
         "--key", "ops.pub", "--no-cache", "--no-progress"],
        work, max_lines=12,
    )  # fmt: skip
    caught = snap.returncode == 0 and sealed.returncode == 1 and "clip.py" in sealed.stdout
    _show(
        f"\n=> the edited file is {'named' if caught else 'NOT caught'}"
        + (" (RECORD alone missed it)" if plain.returncode == 0 else "")
    )
    return caught


def _act_watch(work: Path, key: bytes) -> tuple[bool, str]:
    import logging

    from trainguard.demo import training

    run_id = "pretrain-7b-demo"
    (work / "run.key").write_text(key.hex())
    _show(
        f"A run of {training.STEPS} steps under trainguard.watch (ledger: ledger.db, "
        f"checkpoints every {training.CHECKPOINT_EVERY} steps).\nPlanted code arms "
        f"itself at step {training.PATCH_STEP} because the job claims "
        f"{training.JOB_GPUS} GPUs: clipping flips the gradients and\nthe optimizer step "
        f"sleeps now and then; after step {training.EDIT_STEP - 1} it also edits a weight.\n"
    )
    logging.getLogger("trainguard").setLevel(logging.ERROR)  # the summary below says it all
    started = time.perf_counter()
    alerts = training.train(work / "checkpoints", str(work / "ledger.db"), run_id, key)
    _show(
        f"trained in {time.perf_counter() - started:.1f} s; the guard raised {len(alerts)} alerts:"
    )
    firsts: dict[str, list[int]] = {}
    messages: dict[str, str] = {}
    for a in alerts:
        firsts.setdefault(a.rule, []).append(a.step)
        short = textwrap.shorten(a.message, 80, placeholder=" ...")
        messages.setdefault(a.rule, f"{a.severity!s:8} {a.rule}  {short}")
    for rule, steps in sorted(firsts.items(), key=lambda kv: kv[1][0]):
        more = f" (and {len(steps) - 1} later steps)" if len(steps) > 1 else ""
        _show(f"  step {steps[0]:>3}  {messages[rule]}{more}")
    expected = {
        "TG1304": training.PATCH_STEP,
        "TG1306": training.PATCH_STEP,
        "TG1301": training.EDIT_STEP,
    }
    right = all(firsts.get(r, [None])[0] == s for r, s in expected.items())
    early = [a for a in alerts if a.step < training.PATCH_STEP]
    _show(
        f"\n=> caught at step {training.PATCH_STEP} (code patched, update against the "
        f"gradient) and step {training.EDIT_STEP} (weight edited outside the optimizer); "
        f"{len(early)} alerts before the sabotage began."
        if right
        else "\n=> NOT caught at the planted steps"
    )
    return right and "TG1307" in firsts and not early, run_id


def _act_replay(work: Path, run_id: str) -> bool:
    from trainguard.demo import training

    _show(
        "Replay re-runs each checkpoint's segment with the team's own training code "
        "(here trainguard.demo.training:build)\nand compares every step's fingerprints "
        "with the ledger, bit for bit:\n"
    )
    proc = _trainguard(
        ["replay", run_id, "--ledger", "ledger.db",
         "--entry", "trainguard.demo.training:build", "--key-file", "run.key"],
        work, max_lines=24,
    )  # fmt: skip
    named = f"DIVERGED at step {training.PATCH_STEP}" in proc.stdout
    _show(
        f"\n=> the first dishonest step is {training.PATCH_STEP}; steps before it replay exactly"
        if named and proc.returncode == 1
        else "\n=> replay did NOT name the first dishonest step"
    )
    return named and proc.returncode == 1


def _act_diff(work: Path) -> bool:
    import torch

    from trainguard import load

    published = work / "published"
    published.mkdir()
    original = work / "checkpoints" / "ckpt-60.pt"
    state = load(original)
    with torch.no_grad():
        state["model"]["3.weight"][0, 5:8] *= 1.5  # a quiet edit, at rest
    torch.save(state, published / "ckpt-60.pt")
    _show(
        "The final checkpoint was copied to the store for evaluation; there, three weights "
        "were scaled by 1.5.\nWhat changed, against the run's own copy?\n"
    )
    proc = _trainguard(
        ["diff", "checkpoints/ckpt-60.pt", "published/ckpt-60.pt"], work, max_lines=12
    )
    named = "model.3.weight" in proc.stdout and "TG150" in proc.stdout
    _show(
        "\n=> one tensor changed, in 3 of its 32 elements, and no optimizer step explains it"
        if named and proc.returncode == 1
        else "\n=> diff did NOT name the edited tensor"
    )
    return named and proc.returncode == 1


def _act_report(work: Path, run_id: str) -> bool:
    proc = _trainguard(
        ["report", run_id, "--ledger", "ledger.db", "--checkpoint-dir", "checkpoints",
         "-o", "report.html"],
        work, max_lines=6,
    )  # fmt: skip
    html = work / "report.html"
    ok = proc.returncode == 1 and html.exists() and "TG1306" in html.read_text(encoding="utf-8")
    _show(
        f"\n=> {html} ({html.stat().st_size:,} bytes, no network needed): the timeline with "
        "each alert marked, the alerts and\n   their evidence, ledger verification, and "
        "checkpoint diffs around the alert steps."
        if ok
        else "\n=> the report was NOT written"
    )
    return ok


def run_demo(keep: str | None = None) -> int:
    """Play the acts; 0 when each caught what it planted and flagged nothing clean."""
    from trainguard.demo.store import scan_store

    with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
        work = Path(keep).resolve() if keep else Path(tmp)
        if keep and work.exists() and any(work.iterdir()):
            from trainguard.errors import UsageError

            raise UsageError(f"--keep {keep}: the folder is not empty; give a new one")
        work.mkdir(parents=True, exist_ok=True)
        _show(
            "trainguard demo: the 2024 training-sabotage incident, played on this machine.\n"
            f"Working folder: {work}"
            + ("" if keep else " (deleted at the end; --keep DIR keeps it)")
        )
        started = time.perf_counter()
        results: dict[str, bool] = {}
        _heading(1, "A shared checkpoint store with planted files: is this file safe to load?")
        results["scan"] = scan_store(work / "store", _show)
        if not _have_torch():
            _show(
                "\ntorch is not installed: the acts that train and load models are skipped "
                "(pip install 'trainguard[torch]', or `make demo`)."
            )
        else:
            key = (
                bytes(range(32)) if os.environ.get("TRAINGUARD_DEMO_FIXED_KEY") else os.urandom(32)
            )
            acts: list[tuple[str, str, Callable[[], bool]]] = [
                ("protect", "A colleague loads a planted checkpoint anyway: protect()",
                 lambda: _act_protect(work)),
                ("env", "The cluster's optimizer code is edited: env verify",
                 lambda: _act_env(work)),
            ]  # fmt: skip
            for number, (name, title, act) in enumerate(acts, start=2):
                _heading(number, title)
                results[name] = act()
            _heading(4, "A training run is sabotaged the way the incident describes: watch")
            results["watch"], run_id = _act_watch(work, key)
            _heading(5, "Which step stopped being honest? replay")
            results["replay"] = _act_replay(work, run_id)
            _heading(6, "A published checkpoint edited at rest: diff")
            results["diff"] = _act_diff(work)
            _heading(7, "The run's story for the people in the debugging meeting: report")
            results["report"] = _act_report(work, run_id)
        _show(f"\n{_RULE}")
        caught = [name for name, ok in results.items() if ok]
        missed = [name for name, ok in results.items() if not ok]
        _show(
            f"{len(caught)}/{len(results)} acts caught what was planted "
            f"({', '.join(caught) or 'none'})"
            + (f"; NOT: {', '.join(missed)}" if missed else "")
            + f"; {time.perf_counter() - started:.0f} s in all."
        )
        if keep:
            _show(f"Everything is kept in {work}; open {work / 'report.html'} in a browser.")
        return 0 if not missed else 1
