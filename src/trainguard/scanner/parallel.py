"""Scanning many files at once: worker processes on this machine (``--jobs N``) or a Ray
cluster (``--ray ADDRESS``).

Each worker runs the same per-file scan as one process (``scan_file``), so the
findings, JSON and SARIF are the same; results come back in the walk's order.
On Ray, tasks read files by path, so on a cluster every node must see the store
at the same path (a shared filesystem), and each file is read by the node that
runs its task.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from trainguard.errors import MissingExtraError, UsageError
from trainguard.findings import FileResult
from trainguard.limits import Limits
from trainguard.scanner.engine import Runner, scan_file
from trainguard.scanner.policy import Policy

# Files per task: large enough that a task's overhead (a process hop, a Ray
# task) is small beside scanning, small enough to balance and report progress.
BATCH = 32
LOCAL_RAY = "local"


def scan_batch(paths: Sequence[str], policy: Policy, limits: Limits) -> list[FileResult]:
    return [scan_file(p, policy=policy, limits=limits) for p in paths]


def _batches(paths: Sequence[str]) -> list[Sequence[str]]:
    return [paths[i : i + BATCH] for i in range(0, len(paths), BATCH)]


def process_runner(jobs: int, policy: Policy, limits: Limits) -> Runner:
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")

    def run(paths: Sequence[str]) -> Iterator[FileResult]:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(scan_batch, b, policy, limits) for b in _batches(paths)]
            for future in futures:  # in order, so reports equal a one-process scan's
                yield from future.result()

    return run


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", "Scanning on a Ray cluster") from None
    return ray


def ray_runner(address: str, policy: Policy, limits: Limits) -> Runner:
    """Tasks on the cluster at ``address`` (``local`` starts one on this machine)."""

    def run(paths: Sequence[str]) -> Iterator[FileResult]:
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            _init(ray, address)
        try:
            task = ray.remote(scan_batch)
            policy_ref, limits_ref = ray.put(policy), ray.put(limits)
            futures = [task.remote(b, policy_ref, limits_ref) for b in _batches(paths)]
            for future in futures:
                yield from ray.get(future)
        finally:
            if started_here:
                ray.shutdown()

    return run


def _init(ray: Any, address: str) -> None:
    quiet = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": False}
    if address == LOCAL_RAY:
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            # A scan moves paths and findings, not tensors: a small object store.
            object_store_memory=128 * 1024 * 1024,
            **quiet,
        )
    else:
        ray.init(address=address, **quiet)


def runner_for(
    *, jobs: int = 1, ray: str | None = None, policy: Policy, limits: Limits
) -> Runner | None:
    """The runner for ``--jobs``/``--ray``; None means "in this process"."""
    if ray is not None:
        return ray_runner(ray, policy, limits)
    if jobs != 1:
        return process_runner(jobs, policy, limits)  # says why when jobs < 1
    return None
