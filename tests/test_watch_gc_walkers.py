"""watch() and its steps while other threads walk the garbage collector's objects.

Red team s5 (/work/tmp/s5/red_report.md, family 5, run_F_gc_crash.py): a thread calling
``gc.get_objects()`` while ``watch()`` started (memory profilers, leak finders,
objgraph do this) made ``watch()`` raise ``SystemError: Objects/tupleobject.c: bad
argument to internal function``, 6 of 6 starts.  The cause is CPython's
``tuple(iterable)``: it allocates a tuple tracked by the collector, then fills it
while the iterable runs, and resizes it at the end, which requires that nothing else
holds it.  When the iterable runs Python code (a generator expression, ``map`` of a
Python function) the interpreter can switch threads mid-fill, and a walker's
``gc.get_objects()`` then holds the half-built tuple (python/cpython#39117,
gh-107137).  A tuple built from a list is made at its final size in one C call, with
no Python code between, so the monitor builds its tuples from lists (or C-level maps):
the first test holds the monitor's code to that; the second starts guards, and steps
them, under random walkers.
"""

from __future__ import annotations

import ast
import gc
import pathlib
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402

MONITOR = pathlib.Path(trainguard.__file__).parent / "monitor"
# map() of these runs no Python code (C functions of objects the monitor builds).
C_LEVEL = {"id", "len", "type", "_CODE", "int", "bool"}


def _runs_python(arg: ast.expr) -> bool:
    if isinstance(arg, ast.GeneratorExp):
        return True
    if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "map"):
        return False
    fn = arg.args[0] if arg.args else None
    c_level = (isinstance(fn, ast.Name) and fn.id in C_LEVEL) or (
        isinstance(fn, ast.Attribute)
        and isinstance(fn.value, ast.Name)
        and fn.value.id == "operator"
    )
    return not c_level or any(_runs_python(a) for a in arg.args[1:])


def test_the_monitor_never_builds_a_tuple_while_python_code_runs() -> None:
    found = []
    for path in sorted(MONITOR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "tuple"
                and len(node.args) == 1
                and _runs_python(node.args[0])
            ):
                found.append(f"{path.relative_to(MONITOR)}:{node.lineno}")
    assert not found, f"tuple(<generator or map of Python code>), build a list first: {found}"


def _walker(rng: random.Random, stop: threading.Event, kind: str) -> Any:
    pause = rng.choice([0.0002, 0.001, 0.002])
    target = torch.nn.Linear(2, 2)

    def run() -> None:
        while not stop.is_set():
            if kind == "objects":
                found = gc.get_objects()
            elif kind == "objects0":
                found = gc.get_objects(generation=0)
            elif kind == "referrers":
                found = gc.get_referrers(target, torch)
            else:
                found = [tuple([i]) for i in range(2000)]
                gc.collect(0)
            del found
            if pause:
                time.sleep(pause)

    return threading.Thread(target=run, daemon=True)


def _start_and_step(rng: random.Random) -> None:
    width = rng.choice([4, 8, 16])
    layers = [torch.nn.Linear(width, width) for _ in range(rng.randrange(1, 4))]
    model = torch.nn.Sequential(*layers)
    opt = rng.choice([torch.optim.SGD, torch.optim.Adam])(model.parameters(), lr=1e-2)
    budget = rng.choice([None, 0.05])
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=budget)
    x = torch.randn(8, width)
    for _ in range(rng.randrange(1, 3)):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, batch=x)
    guard.close()


def _walked(seed: int) -> None:
    """Guards started and stepped while 1-3 walker threads run (in a fresh process)."""
    rng = random.Random(seed)
    _start_and_step(rng)  # torch's lazy imports (torch._dynamo) happen before the walkers
    stop = threading.Event()
    # One walks every object (what the red team's profiler did), others at random.
    kinds = ["objects", *rng.choices(["objects", "objects0", "referrers", "collect_alloc"], k=2)]
    walkers = [_walker(rng, stop, kind) for kind in kinds[: rng.randrange(1, 4)]]
    for w in walkers:
        w.start()
    try:
        for _ in range(2):
            _start_and_step(rng)
    finally:
        stop.set()
        for w in walkers:
            w.join()


def test_watch_starts_and_steps_under_gc_walkers() -> None:
    # In a fresh process: a walk of every object holds the GIL for the whole walk, and in
    # the suite's own process (millions of objects, GBs, after 1800 tests) the walkers
    # left the guard almost no time at all (CI sat in this test for minutes).
    seed = seeded().randrange(1 << 30)
    code = f"import tests.test_watch_gc_walkers as t; t._walked({seed})"
    root = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (seed, done.stdout[-3000:], done.stderr[-3000:])
