"""The shape of the package: no import cycles, no oversized modules, every module importable.

The import graph is read with :mod:`ast`, so it sees every import the code
could run: top-level ones, function-local ones and those under
``TYPE_CHECKING`` (a cycle that only the type checker follows still says two
modules are one concern).  ``from pkg import submodule`` is an edge to the
submodule; ``from pkg import name`` an edge to ``pkg``.  Imports by a string
(``importlib.import_module``, ``python -m``) are not edges: they are how the
lazy tables (the format registry, the render table) and worker processes load
code on demand.

The known-exception lists are checked both ways: an entry that is no longer
needed fails the test, so that whoever fixes the cycle or splits the module
also removes the entry, and the lists cannot rot.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "trainguard"
MAX_LINES = 600

# Data tables, allowed to be long for good.
DATA_TABLES = {
    "trainguard.rules": "the rule table (ids, titles, help)",
    "trainguard.scanner.picklevm.machine": "the pickle opcode table",
}
# issue 15: being split.  Remove an entry when its module is under MAX_LINES.
KNOWN_OVERSIZE = {
    "trainguard.scanner.ziplenient": "issue 15: being split",
}
# issue 15: cycles outside render/explain/ledger that their owners are breaking.
# Each entry is one strongly connected component of the import graph, exactly.
KNOWN_CYCLES: set[frozenset[str]] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = name.split(".")
    # Inside a package's __init__, level 1 is the package itself.
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every trainguard module that ``name`` imports anywhere in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(frozenset(component))
    return out


def a_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """One concrete cycle through the component, to print (a path back to its start)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return sorted(component)


def test_graph_reader_follows_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself: function-local, TYPE_CHECKING, relative, submodule and name imports."""
    code = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from .. import name_in_parent\n"
        "if TYPE_CHECKING:\n"
        "    from trainguard.x.typed import T\n"
        "def f():\n"
        "    import trainguard.x.local\n"
        "    from trainguard.x import name_in_x\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(code, encoding="utf-8")
    known = {
        "trainguard",
        "trainguard.x",
        "trainguard.x.mod",
        "trainguard.x.sibling",
        "trainguard.x.typed",
        "trainguard.x.local",
    }
    assert imports_of("trainguard.x.mod", path, known) == {
        "trainguard",
        "trainguard.x",
        "trainguard.x.sibling",
        "trainguard.x.typed",
        "trainguard.x.local",
    }
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert a_cycle(graph, frozenset({"a", "b", "c"})) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    unexpected = [c for c in found if c not in KNOWN_CYCLES]
    assert not unexpected, "import cycles:\n" + "\n".join(
        " -> ".join(a_cycle(graph, c)) for c in unexpected
    )
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"KNOWN_CYCLES entries no longer cycles, remove them: {stale}"


def test_data_flows_one_way_to_the_renderers() -> None:
    """explain/ returns data: it imports neither the renderers nor the CLI; render/ no CLI."""
    graph = import_graph()
    wrong = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if (
            module.startswith("trainguard.explain")
            and target.startswith(("trainguard.render", "trainguard.cli"))
        )
        or (module.startswith("trainguard.render") and target.startswith("trainguard.cli"))
    )
    assert not wrong, wrong


def test_one_html_escaper() -> None:
    """Only the HTML page module may import :mod:`html`: every page escapes through it."""
    users = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "html" for a in node.names
            ):
                users.append(name)
            elif (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "html"
                and not node.level
            ):
                users.append(name)
    assert sorted(set(users)) == ["trainguard.render.html_page"]


def test_no_module_over_the_limit() -> None:
    lengths = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()
    }
    over = {n: k for n, k in lengths.items() if k > MAX_LINES}
    unexpected = {n: k for n, k in over.items() if n not in DATA_TABLES and n not in KNOWN_OVERSIZE}
    assert not unexpected, f"modules over {MAX_LINES} lines: {unexpected}"
    stale = sorted(n for n in KNOWN_OVERSIZE if n not in over)
    assert not stale, f"KNOWN_OVERSIZE entries now fit, remove them: {stale}"
    missing = sorted(n for n in [*DATA_TABLES, *KNOWN_OVERSIZE] if n not in lengths)
    assert not missing, f"listed modules that do not exist: {missing}"


_IMPORT_ALL = """
import importlib, json, sys
failed, skipped = {}, {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
        # The spelling users write, which a function shadowing its package breaks.
        exec(f"import {name} as _m")
        assert sys.modules[name] is _m, "import as gives another object"
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.split(".")[0] != "trainguard":
            skipped[name] = missing  # an optional dependency not installed here
        else:
            failed[name] = repr(exc)
    except Exception as exc:
        failed[name] = repr(exc)
print(json.dumps({"failed": failed, "skipped": skipped}))
"""


def test_every_module_imports_as_written() -> None:
    # Importing __main__ runs the command line; it is imported by `python -m` only.
    names = sorted(n for n in modules() if not n.endswith(".__main__"))
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert not result["failed"], result["failed"]
    # Skips are fine where an optional extra is missing; they must not be all.
    assert len(result["skipped"]) < len(names) // 2, result["skipped"]
