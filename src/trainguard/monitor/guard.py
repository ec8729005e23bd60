"""``trainguard.watch``: attest every training step, and say when that stops being true.

Contract for a plain loop: call ``guard.step(loss=loss, batch=inputs)`` right
after ``optimizer.step()``.  The optimizer's step hooks take fingerprints of
the weights and optimizer state before and after each step; ``guard.step``
writes the step's record to the ledger and runs the per-step checks.  Steps
are numbered from 0.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.monitor import identity, rng
from trainguard.monitor.budget import WARMUP_STEPS, ChunkSample, VersionWatch, chunk_count
from trainguard.monitor.direction import DirectionCheck
from trainguard.monitor.fingerprint import (
    Fingerprint,
    Fingerprinter,
    hyperparameters,
    optimizer_tensors,
)
from trainguard.monitor.stats import RobustWindow, is_spike, is_stall
from trainguard.rules import RULES

log = logging.getLogger("trainguard.monitor")


@dataclass(frozen=True)
class Alert:
    rule: str
    step: int
    rank: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    severity: str = ""  # the rule's default unless the check raised it

    def __post_init__(self) -> None:
        if not self.severity:
            object.__setattr__(self, "severity", str(RULES[self.rule].severity))


class TrainingStopped(TrainguardError):
    """Raised by ``guard.step`` when ``on_alert="stop"`` and an alert fired."""

    def __init__(self, alerts: list[Alert]) -> None:
        self.alerts = alerts
        first = alerts[0]
        super().__init__(f"training stopped at step {first.step}: {first.rule} {first.message}")


class Guard:
    def __init__(
        self,
        model: Any,
        optimizer: Any,
        *,
        ledger: Any = None,
        run_id: str | None = None,
        scheduler: Any = None,
        dataloader: Any = None,
        every: int = 1,
        budget: float | None = None,
        measure_grad_norm: bool = True,
        key: bytes | None = None,
        on_alert: str | Callable[[Alert], None] = "record",
        data_check: bool = False,
        sync_every: int = 50,
        min_stall_seconds: float = 0.1,
        rank: int | None = None,
        world_size: int | None = None,
        sign_key: Any = None,
        sign_every: int = 100,
        env_snapshot: str | None = None,
        env_key: Any = None,
        env_paths: list[str] | None = None,
        tensor_digests: bool = True,
        hang_seconds: float | None = 300.0,
        hang_factor: float = 20.0,
        on_hang: str | Callable[[Alert], None] = "record",
        hang_stacks: bool = True,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataloader = dataloader
        self.every = max(1, every)
        if budget is not None and not 0.0 < budget <= 1.0:
            raise TrainguardError(
                f"budget must be a fraction of the step time in (0, 1], not {budget}"
            )
        # None: exact fingerprints at every boundary; a fraction: see watch/budget.py.
        self.budget = budget
        self._versions = VersionWatch()
        self._checking = True  # whether the coming boundary gets full fingerprints
        self._full_cost = 0.0  # seconds for one full fingerprint of weights and optimizer state
        self._chunk_cost = 0.0  # seconds to sum one sampled chunk
        self._sample: tuple[list[tuple[str, Any]], list[tuple[int, int]]] | None = None
        self.checked_boundaries = 0  # boundaries with full fingerprints
        self.sampled_share = 0.0  # budget mode: share of chunks read at the last boundary
        self._sample_count: int | None = None
        self._overhead = 0.0  # seconds spent in the guard during the current step
        self.last_step_overhead = 0.0  # ... and during the last finished one
        # False: the loop passes guard.step(grad_norm=...) (what clip_grad_norm_ returned),
        # which saves a pass over every gradient per step.
        self.measure_grad_norm = measure_grad_norm
        self.run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.alerts: list[Alert] = []
        self.on_alert = on_alert
        self.data_check = data_check
        self.sync_every = sync_every
        self.min_stall = min_stall_seconds
        # A private key (object or PEM path): the ledger head of this rank is
        # signed every ``sign_every`` steps and at close, so truncation shows.
        self.sign_key = sign_key
        self.sign_every = max(1, sign_every)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.key = key or _shared_key(self.world_size)
        self.fp = Fingerprinter(self.key)
        self._sampler = ChunkSample(self.key)
        # Per-tensor digests in each step record (8 characters per tensor) let
        # `trainguard replay` name the tensors that diverge.
        self.tensor_digests = tensor_digests
        self.step_index = 0
        self._owns_ledger = isinstance(ledger, (str, os.PathLike))
        self.ledger = _open(ledger)
        self._pending: dict[str, Any] | None = None
        self._stopped: list[Alert] = []
        self._last_step_end = time.perf_counter()
        self.windows = {k: RobustWindow() for k in ("time", "loss", "grad_norm")}
        self._stalls: list[int] = []
        self._sample_fps: dict[int, str] = {}
        self._batch_indices: list[list[int]] = []
        self._seed_calls: list[str] = []

        named = list(model.named_parameters())
        self.named_params = named
        self.direction = DirectionCheck(named, self.key)
        self._hooks = [
            optimizer.register_step_pre_hook(lambda opt, a, k: self._before_step()),
            optimizer.register_step_post_hook(lambda opt, a, k: self._after_step()),
        ]
        self.seeds = rng.SeedWatch(self._seed_calls.append)
        self.seeds.install()
        if dataloader is not None and data_check:
            self._wrap_sampler(dataloader)
        self._probes = identity.probes(optimizer, dataloader)
        self._identity = identity.snapshot(self._probes)
        self._initial_seed = rng.initial_seed()
        self._rng_seen: set[tuple[str, str]] = set()
        self._hp = hyperparameters(optimizer)
        started = time.perf_counter()
        self._after: Fingerprint = self.fp.fingerprint(named)
        self._opt_after: Fingerprint = self.fp.fingerprint(optimizer_tensors(optimizer))
        self._full_cost = time.perf_counter() - started
        if budget is not None:
            self._versions.remember(self._watched_tensors())
        self._opt_names = self._opt_after.names()
        self._before_checked = False
        environment = None
        if env_snapshot is not None:
            environment = self._check_environment(env_snapshot, env_key, env_paths)
        from trainguard.monitor import conditions

        self._record(
            "run-start",
            {
                "key_id": self.fp.digest_bytes(b"key-id"),
                # What `trainguard replay` compares against (docs/replay.md).
                "every": self.every,
                "budget": self.budget,
                # False: grad_norm in step records is what the loop passed (replay skips it).
                "measure_grad_norm": self.measure_grad_norm,
                "param_names": self._after.names(),
                "optimizer_names": self._opt_names,
                "state": self._state_digests(),
                "conditions": conditions.gather(model),
                "world_size": self.world_size,
                "optimizer": type(optimizer).__name__,
                "params": sum(p.numel() for _, p in named),
                "identity": self._identity,
                "initial_seed": self._initial_seed,
                "hyperparameters": self._hp,
                "torch": torch.__version__,
                "pid": os.getpid(),
                "environment": environment,  # the start-up check, or None if not asked for
            },
        )
        from trainguard.monitor.watchdog import Watchdog

        # Ranks that hang without dying (docs/watch.md); None when hang_seconds is None.
        self.watchdog = Watchdog.start_for(
            self, hang_seconds, factor=hang_factor, on_hang=on_hang, stacks=hang_stacks
        )

    # -- alerts ------------------------------------------------------------
    def _alert(self, rule: str, message: str, severity: str = "", **evidence: Any) -> None:
        alert = Alert(rule, self.step_index, self.rank, message, evidence, severity)
        self.alerts.append(alert)
        log.warning("trainguard: step %d rank %d: %s %s", alert.step, alert.rank, rule, message)
        self._record(
            "alert",
            {"rule": rule, "severity": alert.severity, "message": message, "evidence": evidence},
        )
        if callable(self.on_alert):
            self.on_alert(alert)
        elif self.on_alert == "stop":
            self._stopped.append(alert)

    def _record(self, kind: str, payload: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.append(self.run_id, kind, payload, step=self.step_index, stream=self.rank)

    def _check_environment(
        self, snapshot_path: str, public_key: Any, paths: list[str] | None
    ) -> dict[str, Any]:
        """Compare the Python environment with a sealed snapshot before training.

        Returns what the run-start record says about the check (a report shows it)."""
        from trainguard.env.snapshot import read_snapshot
        from trainguard.env.verify import EnvOptions, verify_environment
        from trainguard.findings import Severity
        from trainguard.signing.keys import load_public_key

        if public_key is None:
            raise TrainguardError("env_snapshot needs env_key (the snapshot's public key)")
        key = (
            load_public_key(public_key)
            if isinstance(public_key, (str, os.PathLike))
            else public_key
        )
        snapshot = read_snapshot(os.fspath(snapshot_path), key)
        result = verify_environment(EnvOptions(paths=paths, against=snapshot, check_pyc=False))
        bad = [f for f in result.report.findings if f.severity >= Severity.HIGH]
        if bad:
            self._alert(
                "TG1312",
                f"{len(bad)} file(s) differ from the sealed environment: "
                + "; ".join(f"{f.file}: {f.rule}" for f in bad[:5]),
                files=[f.file for f in bad[:50]],
            )
        return {"snapshot": os.path.basename(os.fspath(snapshot_path)), "differing": len(bad)}

    # -- the optimizer hooks ---------------------------------------------------
    def _before_step(self) -> None:
        started = time.perf_counter()
        try:
            self._before_step_checks()
        finally:
            self._overhead += time.perf_counter() - started

    def _after_step(self) -> None:
        started = time.perf_counter()
        try:
            self._after_step_checks()
        finally:
            self._overhead += time.perf_counter() - started

    def _before_step_checks(self) -> None:
        if self._pending is not None:  # guard.step was not called for the last step
            self._finish_step(loss=None, batch=None)
        if self.budget is None:
            check = self.step_index % self.every == 0
        else:
            check = self._checking
            if not check:
                self._check_versions()
                self._check_sample()
        self._step_started = time.perf_counter()
        if check:
            self.checked_boundaries += 1
            before = self.fp.fingerprint(self.named_params)
            if before.digest != self._after.digest:
                changed = before.changed(self._after)
                self._alert(
                    "TG1301",
                    f"{len(changed)} parameter tensor(s) changed since the "
                    f"last optimizer step: {', '.join(changed[:5])}",
                    tensors=changed[:50],
                )
            opt_before = self.fp.fingerprint(optimizer_tensors(self.optimizer))
            if opt_before.digest != self._opt_after.digest:
                changed = opt_before.changed(self._opt_after)
                self._alert(
                    "TG1302",
                    f"optimizer state changed outside the step: {', '.join(changed[:5])}",
                    tensors=changed[:50],
                )
            self._before = before
            self._full_cost = time.perf_counter() - self._step_started
        if check or self.budget is not None:  # cheap: every step when on a budget
            self._check_hyperparameters()
            self._check_identity()
            self._check_rng()
        self._before_checked = check
        flipped = self.direction.before_step()
        if flipped:
            self._alert(
                "TG1306",
                f"gradients of {len(flipped)} tensor(s) changed sign between "
                f"backward and optimizer.step (clipping only shrinks them): "
                f"{', '.join(flipped[:5])}",
                tensors=flipped[:50],
            )
        self._grad_norm = self._total_grad_norm() if self.measure_grad_norm else None

    def _after_step_checks(self) -> None:
        cosine = self.direction.after_step(self.optimizer)
        if cosine is not None and cosine < 0:
            self._alert(
                "TG1306",
                f"the update points against the direction "
                f"{type(self.optimizer).__name__} prescribes (cosine {cosine:.3f})",
                cosine=cosine,
            )
        self._hp = hyperparameters(self.optimizer)
        optimizer_seconds = time.perf_counter() - self._step_started
        if self.budget is not None:
            watched = self._watched_tensors()
            self._versions.remember(watched)
            self._checking = self._full_due()
            if not self._checking:
                # Sampled chunks only: the record leaves the full fingerprints out.
                self._take_sample(watched)
                self._pending = {
                    "cosine": cosine,
                    "optimizer_step_seconds": optimizer_seconds,
                    "sampled": round(self.sampled_share, 6),
                }
                if self._before_checked:
                    self._pending["before"] = self._before.digest
                    self._pending["plain"] = {"before": self._before.plain}
                    if self.tensor_digests:
                        self._pending["tensors"] = {"before": self._before.compact()}
                return
        previous = self._after
        self._after = self.fp.fingerprint(self.named_params)
        self._opt_after = self.fp.fingerprint(optimizer_tensors(self.optimizer))
        self._pending = {
            "after": self._after.digest,
            "optimizer": self._opt_after.digest,
            "plain": {"after": self._after.plain, "optimizer": self._opt_after.plain},
            "cosine": cosine,
            "optimizer_step_seconds": optimizer_seconds,
        }
        if self._before_checked:  # only a "before" that was fingerprinted at this step
            self._pending["before"] = self._before.digest
            self._pending["plain"]["before"] = self._before.plain
        if self.tensor_digests:
            tensors = {"after": self._after.compact(), "optimizer": self._opt_after.compact()}
            if self._before_checked and self._before.digest != previous.digest:
                tensors["before"] = self._before.compact()  # otherwise the last step's "after"
            self._pending["tensors"] = tensors
        names = self._opt_after.names()
        if names != self._opt_names:
            self._pending["optimizer_names"] = self._opt_names = names

    def _watched_tensors(self) -> list[tuple[str, Any]]:
        return [
            *self.named_params,
            *(("optimizer " + n, t) for n, t in optimizer_tensors(self.optimizer)),
        ]

    def _check_versions(self) -> None:
        changed = self._versions.changed(self._watched_tensors())
        self._alert_changed(changed, "written in place", "version counter", "version")

    def _alert_changed(self, changed: list[str], verb: str, seen_by: str, via: str) -> None:
        """TG1301 for the weights and TG1302 for the optimizer tensors among ``changed``
        (names from :meth:`_watched_tensors`), found between two steps by ``seen_by``."""
        params = [n for n in changed if not n.startswith("optimizer ")]
        moments = [n.removeprefix("optimizer ") for n in changed if n.startswith("optimizer ")]
        if params:
            self._alert(
                "TG1301",
                f"{len(params)} parameter tensor(s) {verb} since the last "
                f"optimizer step ({seen_by}): {', '.join(params[:5])}",
                tensors=params[:50],
                via=via,
            )
        if moments:
            self._alert(
                "TG1302",
                f"optimizer state {verb} outside the step ({seen_by}): {', '.join(moments[:5])}",
                tensors=moments[:50],
                via=via,
            )

    def _full_due(self) -> bool:
        """Budget mode: full fingerprints at the boundary after this step (warm-up, rank sync)?"""
        step = self.step_index
        if step < WARMUP_STEPS or not self.windows["time"].ready():
            return True
        return bool(self.world_size > 1 and self.sync_every and (step + 1) % self.sync_every == 0)

    def _take_sample(self, watched: list[tuple[str, Any]]) -> None:
        """Budget mode, after the step: exact sums of a keyed sample of chunks."""
        assert self.budget is not None
        total = self._sampler.total(watched)
        if not self._chunk_cost and total:
            self._chunk_cost = self._full_cost / total  # until a sample has been timed
        median, _ = self.windows["time"].center_scale()
        target = 0.85 * self.budget * median  # a margin: fixed costs vary from step to step
        if self._sample_count is None:
            # Start at half the target (chunk_count reads each chunk twice); the
            # feedback below grows the sample from there.
            count = chunk_count(0.5 * target / median, median, self._chunk_cost, total)
        else:
            # Feedback on what the guard really cost last step (sample, probes,
            # identity and seed checks, the ledger write): the sample grows or shrinks
            # until the whole guard takes its budget.
            spent = self.last_step_overhead
            ratio = target / spent if spent > 0 else 1.5
            count = int(self._sample_count * min(1.5, max(0.5, ratio)))
        if self.budget >= 1.0:
            count = total  # no limit: every chunk, every step
        count = max(1, min(total, count))
        self._sample_count = count
        started = time.perf_counter()
        views = self._sampler.choose(watched, self.step_index, count)
        sums = self.fp.sums([v for _, v in views])
        if views:
            cost = (time.perf_counter() - started) / len(views)
            self._chunk_cost = cost if not self._chunk_cost else 0.8 * self._chunk_cost + 0.2 * cost
        self.sampled_share = len(views) / total if total else 0.0
        self._sample = (views, sums)

    def _check_sample(self) -> None:
        """Budget mode, before the next step: the same chunks must hold the same bits."""
        if self._sample is None:
            return
        views, sums = self._sample
        self._sample = None
        now = self.fp.sums([v for _, v in views])
        changed = sorted({name for (name, _), a, b in zip(views, sums, now, strict=True) if a != b})
        self._alert_changed(changed, "changed", "sampled chunks", "sample")

    def _state_digests(self) -> dict[str, Any]:
        """Digests of the parameters and optimizer state as they are now (docs/replay.md)."""
        tensors = (
            {"params": self._after.compact(), "optimizer": self._opt_after.compact()}
            if self.tensor_digests
            else {}
        )
        return {
            "params": self._after.digest,
            "optimizer": self._opt_after.digest,
            "plain": {"params": self._after.plain, "optimizer": self._opt_after.plain},
            "tensors": tensors,
        }

    def _total_grad_norm(self) -> float:
        torch = self.torch
        norms = [
            p.grad.detach().norm(dtype=torch.float32)
            for _, p in self.named_params
            if p.grad is not None
        ]
        if not norms:
            return 0.0
        return float(torch.stack([n.to("cpu") for n in norms]).norm())

    # -- per-step checks ----------------------------------------------------------
    def _check_hyperparameters(self) -> None:
        now = hyperparameters(self.optimizer)
        scheduled = None
        if self.scheduler is not None and hasattr(self.scheduler, "get_last_lr"):
            scheduled = [float(x) for x in self.scheduler.get_last_lr()]
        for i, (old, new) in enumerate(zip(self._hp, now, strict=False)):
            for k in sorted(set(old) | set(new)):
                if old.get(k) == new.get(k):
                    continue
                if (
                    k in ("lr", "initial_lr")
                    and scheduled is not None
                    and i < len(scheduled)
                    and _close(new.get("lr"), scheduled[i])
                ):
                    continue  # the registered scheduler set it
                self._alert(
                    "TG1303",
                    f"param group {i}: {k} changed from {old.get(k)!r} to {new.get(k)!r}",
                    group=i,
                    key=k,
                    old=old.get(k),
                    new=new.get(k),
                )
        if len(now) != len(self._hp):
            self._alert("TG1303", f"param groups changed from {len(self._hp)} to {len(now)}")

    def _check_identity(self) -> None:
        now = identity.snapshot(self._probes)
        changed = identity.differences(self._identity, now)
        if changed:
            self._alert("TG1304", f"patched at run time: {', '.join(changed)}", functions=changed)
            self._identity = now  # report each patch once

    def _check_rng(self) -> None:
        seed = rng.initial_seed()
        calls, self._seed_calls[:] = list(self._seed_calls), []
        if seed != self._initial_seed or calls:
            parts = []
            if seed != self._initial_seed:
                parts.append(f"torch initial seed {self._initial_seed} -> {seed}")
            if calls:
                parts.append(f"called: {'; '.join(calls)}")
            self._alert(
                "TG1305",
                f"random state re-seeded mid-run ({'; '.join(parts)})",
                old_seed=self._initial_seed,
                new_seed=seed,
                calls=calls,
            )
            self._initial_seed = seed
        digests = rng.state_digests()
        last = getattr(self, "_rng_digests", {})
        for name, d in digests.items():
            # An unchanged state is normal (no randomness used this step); a state
            # that moves back to one seen before is a re-seed.
            if d != last.get(name) and (name, d) in self._rng_seen:
                self._alert(
                    "TG1305",
                    f"the {name} random state returned to an earlier state "
                    "(re-seeded with a seed used before)",
                    generator=name,
                )
            self._rng_seen.add((name, d))
        self._rng_digests = digests

    # -- the user's call ----------------------------------------------------------------
    def step(self, loss: Any = None, batch: Any = None, grad_norm: Any = None) -> None:
        """Call right after ``optimizer.step()``: records the step and runs its checks.

        ``grad_norm``: the total gradient norm your loop already has (what
        ``clip_grad_norm_`` returned); with ``watch(..., measure_grad_norm=False)``
        the guard then skips computing it.
        """
        if grad_norm is not None:
            self._grad_norm = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
        self._finish_step(loss, batch)
        if self._stopped:
            stopped, self._stopped = self._stopped, []
            raise TrainingStopped(stopped)

    def _finish_step(self, loss: Any, batch: Any) -> None:
        started = time.perf_counter()
        try:
            self._finish_step_record(loss, batch)
        finally:
            # The guard's own time in this step: what budget mode holds to its share.
            self.last_step_overhead = self._overhead + (time.perf_counter() - started)
            self._overhead = 0.0

    def _finish_step_record(self, loss: Any, batch: Any) -> None:
        now = time.perf_counter()
        step_time = now - self._last_step_end
        self._last_step_end = now
        loss_value = (
            float(loss.detach().item() if hasattr(loss, "detach") else loss)
            if loss is not None
            else None
        )
        self._check_timing(step_time)
        if loss_value is not None:
            if is_spike(self.windows["loss"], loss_value):
                self._alert(
                    "TG1308",
                    f"loss {loss_value:.4g} is far outside its recent range",
                    loss=loss_value,
                )
            self.windows["loss"].add(loss_value)
        grad_norm = getattr(self, "_grad_norm", None)
        if grad_norm is not None:  # None: not measured and not passed to guard.step
            if is_spike(self.windows["grad_norm"], grad_norm):
                self._alert(
                    "TG1308",
                    f"gradient norm {grad_norm:.4g} is far outside its recent range",
                    grad_norm=grad_norm,
                )
            self.windows["grad_norm"].add(grad_norm)
        batch_fp = self._batch_fingerprint(batch)
        record = dict(self._pending or {})
        if batch_fp is not None and "plain" in record:
            record["plain"] = {**record["plain"], "batch": batch_fp.plain}
        record.update(
            {
                "loss": loss_value,
                "grad_norm": grad_norm,
                "step_time": step_time,
                "batch": batch_fp.digest if batch_fp is not None else None,
                "rng": getattr(self, "_rng_digests", {}),
                "lr": [g.get("lr") for g in self._hp],
                "rank": self.rank,
                "world_size": self.world_size,
            }
        )
        self._record("step", record)
        self._pending = None
        if (
            self.sign_key is not None
            and self.ledger is not None
            and ((self.step_index + 1) % self.sign_every == 0)
        ):
            self.ledger.sign_head(self.run_id, self.rank, self.sign_key)
        if self.world_size > 1 and self.sync_every and (self.step_index + 1) % self.sync_every == 0:
            from trainguard.monitor.distributed import compare_ranks

            compare_ranks(self)
        self.step_index += 1

    def _check_timing(self, step_time: float) -> None:
        window = self.windows["time"]
        if is_stall(window, step_time, min_excess=self.min_stall):
            med, _ = window.center_scale()
            self._stalls = [s for s in self._stalls if s > self.step_index - 50]
            self._stalls.append(self.step_index)
            severity = "high" if len(self._stalls) >= 3 else "medium"
            self._alert(
                "TG1307",
                f"step took {step_time:.3f}s, usual {med:.3f}s "
                f"({len(self._stalls)} such steps in the last 50)",
                severity=severity,
                seconds=step_time,
                median=med,
                recent=len(self._stalls),
            )
        else:
            window.add(step_time)

    def _batch_fingerprint(self, batch: Any) -> Fingerprint | None:
        tensors = _tensors_in(batch, self.torch)
        if not tensors:
            return None
        if self.data_check and self._batch_indices:
            self._check_samples(tensors, self._batch_indices.pop(0))
        return self.fp.fingerprint((str(i), t) for i, t in enumerate(tensors))

    def _check_samples(self, tensors: list[Any], indices: list[int]) -> None:
        n = len(indices)
        if not all(t.shape and t.shape[0] == n for t in tensors):
            return
        for row, index in enumerate(indices):
            fp = self.fp.fingerprint((str(i), t[row]) for i, t in enumerate(tensors)).digest
            seen = self._sample_fps.setdefault(index, fp)
            if seen != fp:
                self._alert(
                    "TG1309",
                    f"sample {index} differs from the last time it was loaded",
                    index=index,
                )
                self._sample_fps[index] = fp

    def _wrap_sampler(self, dataloader: Any) -> None:
        batch_sampler = dataloader.batch_sampler
        if batch_sampler is None:
            return
        queue = self._batch_indices
        original_iter = type(batch_sampler).__iter__

        class Recording(type(batch_sampler)):  # type: ignore[misc]
            def __iter__(self) -> Any:
                for indices in original_iter(self):
                    queue.append(list(indices))
                    yield indices

        batch_sampler.__class__ = Recording

    def checkpoint(self, path: str | os.PathLike[str], *, data_state: Any = None) -> dict[str, Any]:
        """Save what ``trainguard replay`` needs to re-run from here; record it in the ledger.

        Call it between steps, after ``guard.step``.  Saves the model, optimizer
        and scheduler states, every random state and the position in the data
        (``data_state``: plain data you want back at replay time, such as the
        epoch) in a file that ``trainguard.load`` reads back, and appends a
        ``checkpoint`` record with the file's BLAKE3 digest.  Returns that
        record's payload.  See docs/replay.md.
        """
        from trainguard.monitor.checkpoint import save

        if self.watchdog is None:
            return save(self, path, data_state=data_state)
        with self.watchdog.paused():  # a long save is not a hang
            return save(self, path, data_state=data_state)

    def close(self, error: BaseException | None = None) -> None:
        """Flush the last step, remove hooks and wrappers; write a run-end record.

        Pass the exception that ended training, if any: when a collective failed
        because a peer died, the ranks that stopped are then reported.
        """
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._pending is not None:
            self._finish_step(None, None)
        if self.world_size > 1 and self.ledger is not None:
            from trainguard.monitor.distributed import check_ranks

            check_ranks(self, failed=error is not None)
        for h in self._hooks:
            h.remove()
        self.direction.remove()
        self.seeds.uninstall()
        self._record(
            "run-end",
            {
                "steps": self.step_index,
                "alerts": len(self.alerts),
                "error": repr(error)[:500] if error is not None else None,
            },
        )
        if self.sign_key is not None and self.ledger is not None:
            self.ledger.sign_head(self.run_id, self.rank, self.sign_key)
            if self.rank == 0:
                # The run head names every rank's head: cutting any stream short shows.
                self.ledger.append(
                    self.run_id,
                    "run-summary",
                    {"world_size": self.world_size, "steps": self.step_index},
                    step=self.step_index,
                    stream=-1,
                )
                self.ledger.sign_head(self.run_id, -1, self.sign_key)
        if self._owns_ledger and self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)


def _close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(float(a) - b) <= 1e-12 + 1e-9 * abs(b)


def _tensors_in(batch: Any, torch: Any) -> list[Any]:
    if batch is None:
        return []
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [v for k in sorted(batch, key=str) for v in _tensors_in(batch[k], torch)]
    if isinstance(batch, (list, tuple)):
        return [v for item in batch for v in _tensors_in(item, torch)]
    return []


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return rank or 0, world or 1


def _shared_key(world_size: int) -> bytes:
    """A fresh secret key, the same on every rank (rank 0 draws it)."""
    key = secrets.token_bytes(32)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [key]
            dist.broadcast_object_list(box, src=0)
            key = box[0]
    return key


def _open(ledger: Any) -> Any:
    if ledger is None or not isinstance(ledger, (str, os.PathLike)):
        return ledger
    from trainguard.ledger import open_ledger

    return open_ledger(os.fspath(ledger))


def watch(model: Any, optimizer: Any, **kwargs: Any) -> Guard:
    """Start watching a training run; see :class:`Guard` for the options."""
    return Guard(model, optimizer, **kwargs)
