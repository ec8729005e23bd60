"""Model repositories: the code a Hugging Face repository asks its loader to run.

Every file of a folder is scanned by content; this module adds what only the
folder as a whole says.  transformers imports the Python modules that a config
names in ``auto_map`` (model, config, tokenizer, processor classes) or in
``custom_pipelines`` when the user passes ``trust_remote_code=True``, together
with what those modules import relatively.  So each config that asks for remote
code is a finding naming the modules and classes that would run, each such
module is a finding of its own, and any other ``*.py`` at the top of the
repository is reported at a low level.

Python source is read as text: never parsed with :mod:`ast` (which compiles),
never imported.  Every read is bounded; a config too large or not valid JSON is
a finding, not a silent skip.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainguard.findings import FileResult, Finding
from trainguard.limits import Limits
from trainguard.rules import finding
from trainguard.scanner.policy import Policy

# Configs transformers reads auto_map from; other top-level JSON files are read
# too when their bytes mention one of the remote-code keys.
CONFIG_NAMES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
_REMOTE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")
_REMOTE_MARKERS = tuple(f'"{k}"'.encode() for k in _REMOTE_KEYS)
_HF_CONFIG_MARKERS = (
    *_REMOTE_MARKERS,
    b'"model_type"',
    b'"architectures"',
    b'"transformers_version"',
    b'"_name_or_path"',
)
_TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer.model", "special_tokens_map.json", "vocab.txt", "merges.txt"}
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".msgpack", ".h5", ".ckpt")
_CONFIG_HEAD = 64 * 1024  # enough of a config.json to see what kind of JSON it is
_MAX_JSON_FILES = 256  # top-level JSON files looked at per repository
_MAX_PY_FILES = 4096  # Python files reported per repository
_MAX_SOURCE = 4 * 1024 * 1024  # bytes of one Python file searched for imports and calls
_MAX_VALUES = 64  # remote-code values kept per config (duplicates included)
_MAX_REFS = 256  # class references kept per config
_MAX_LISTED = 6  # references spelt out in one message
_MAX_CALLS = 8  # dangerous lines quoted per Python file

_REL_FROM = re.compile(r"^[ \t]*from[ \t]+(\.+)([\w.]*)[ \t]+import[ \t]+([^\n#]+)", re.M)
_REL_IMPORT = re.compile(r"^[ \t]*import[ \t]+\.(\S+)[ \t]*$", re.M)
# Rare in modelling code, common in payloads.  A heuristic that names lines to
# read; the verdict on trusted code does not depend on it.
_DANGEROUS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "starts a process",
        re.compile(
            r"\b(?:os\.(?:system|popen|exec\w*|spawn\w*|posix_spawnp?|fork)|subprocess\.\w+"
            r"|pty\.spawn)\s*\("
        ),
    ),
    (
        "runs dynamic code",
        re.compile(
            r"(?<![\w.])(?:exec|eval|__import__)\s*\(|\b(?:marshal|pickle|dill|cloudpickle)"
            r"\.loads?\s*\(|\bimportlib\.import_module\s*\("
        ),
    ),
    (
        "opens a network connection",
        re.compile(
            r"\b(?:socket\.(?:socket|create_connection)|urllib\.request\.\w+|http\.client\.\w+"
            r"|requests\.(?:get|post|put|request)|httpx\.\w+)\s*\("
        ),
    ),
    ("deletes files", re.compile(r"\b(?:shutil\.rmtree|os\.(?:remove|unlink|rmdir))\s*\(")),
    ("loads native code", re.compile(r"\bctypes\.(?:CDLL|cdll|WinDLL|windll|PyDLL)\b")),
)


@dataclass
class RepoFile:
    """What the repository analysis learnt about one file of the folder."""

    format: str
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class CodeRef:
    """``AutoModel -> modeling_x.XModel``: a class a config asks the loader to import."""

    where: str  # "config.json auto_map AutoModel"
    text: str  # the reference as written
    module: str  # "modeling_x" (a file of this repository unless ``repo`` is set)
    cls: str
    repo: str = ""  # "org/name" when the code comes from another repository

    @property
    def module_file(self) -> str:
        return self.module + ".py"


def parse_reference(where: str, text: str) -> CodeRef:
    """``[org/repo--]module.Class`` as transformers splits it."""
    repo, _, rest = text.rpartition("--")
    module, _, cls = rest.rpartition(".")
    return CodeRef(where, text, module or rest, cls, repo)


# -- finding the repositories -----------------------------------------------------


def looks_like_repository(folder: Path, names: Iterable[str]) -> bool:
    """Weights, tokenizer files or a transformers config: a folder a loader reads as a model."""
    names = set(names)
    if names & _TOKENIZER_FILES or names & set(CONFIG_NAMES[1:]):
        return True
    if any(n.endswith(_WEIGHT_SUFFIXES) or n.startswith("pytorch_model") for n in names):
        return True
    if "config.json" in names:
        try:
            with open(folder / "config.json", "rb") as f:
                head = f.read(_CONFIG_HEAD)
        except OSError:
            return False
        return any(m in head for m in _HF_CONFIG_MARKERS)
    return False


def analyse_paths(paths: Iterable[str | os.PathLike[str]], limits: Limits) -> dict[str, RepoFile]:
    """Notes on files of every model repository under ``paths`` (folders only), by path.

    Paths are spelt as :func:`trainguard.scanner.engine.iter_files` spells them, so
    the engine can add each note to the result of the file it concerns.
    """
    notes: dict[str, RepoFile] = {}
    for p in paths:
        if not Path(p).is_dir():
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            if looks_like_repository(Path(root), files):
                for path, note in analyse_repository(Path(root), files, limits).items():
                    if path in notes:
                        notes[path].findings.extend(note.findings)
                    else:
                        notes[path] = note
    return notes


def attach(result: FileResult, note: RepoFile, policy: Policy) -> None:
    """Add the repository's findings on one file to that file's content-scan result."""
    if result.format == "unknown":
        # The repository analysis did read and understand it.
        result.format = note.format
        result.findings = [f for f in result.findings if f.rule != "TG001"]
    result.findings.extend(replace(f, file=result.path) for f in policy.apply(note.findings))


# -- one repository ----------------------------------------------------------------


def analyse_repository(folder: Path, names: Iterable[str], limits: Limits) -> dict[str, RepoFile]:
    names = sorted(names)
    notes: dict[str, RepoFile] = {}
    refs: list[CodeRef] = []
    json_names = [n for n in names if n.endswith(".json")][:_MAX_JSON_FILES]
    for name in json_names:
        note, found = _config_note(folder, name, limits)
        if note is not None:
            notes[str(folder / name)] = note
            refs += found
    local = [r for r in refs if not r.repo]
    by_file: dict[str, list[CodeRef]] = {}
    for ref in local:
        rel = _safe_relative(ref.module_file)
        if rel is not None and (folder / rel).is_file():
            by_file.setdefault(rel, []).append(ref)
    imported = _import_closure(folder, list(by_file))
    top = [n for n in names if n.endswith(".py")]
    for rel in list(dict.fromkeys([*by_file, *imported, *top]))[:_MAX_PY_FILES]:
        notes[str(folder / rel)] = _python_note(folder, rel, by_file.get(rel), imported.get(rel))
    return notes


def _config_note(folder: Path, name: str, limits: Limits) -> tuple[RepoFile | None, list[CodeRef]]:
    cap = limits.max_model_config
    path = folder / name
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except OSError:
        return None, []
    if name not in CONFIG_NAMES and not any(m in raw for m in _REMOTE_MARKERS):
        return None, []
    if len(raw) > cap:
        return RepoFile(
            "json",
            [_finding("TG002", f"{name} is longer than the limit of {cap:,} bytes; not analysed")],
        ), []
    collect = _Collect()
    try:
        json.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"), object_pairs_hook=collect)
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        message = f"{name} is not valid JSON ({type(exc).__name__}); its auto_map was not read"
        return RepoFile("json", [_finding("TG003", message)]), []
    refs = collect.references(name)
    note = RepoFile("hf-config")
    if refs or collect.trusts:
        note.findings.append(_config_finding(folder, name, refs, collect.trusts))
    return note, refs


class _Collect:
    """``object_pairs_hook`` keeping every remote-code value at any depth.

    Duplicate keys are all kept: JSON readers disagree about which one wins.
    """

    def __init__(self) -> None:
        self.values: list[tuple[str, object]] = []
        self.trusts = False

    def __call__(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        for key, value in pairs:
            if key == "trust_remote_code" and value is True:
                self.trusts = True
            elif key in _REMOTE_KEYS[:2] and len(self.values) < _MAX_VALUES:
                self.values.append((key, value))
        return dict(pairs)

    def references(self, name: str) -> list[CodeRef]:
        refs: list[CodeRef] = []
        for key, value in self.values:
            for where, text in _reference_texts(key, value):
                if len(refs) < _MAX_REFS:
                    refs.append(parse_reference(f"{name} {where}", text))
        return refs


def _reference_texts(key: str, value: object) -> Iterator[tuple[str, str]]:
    if key == "auto_map":
        # Tokenizers once wrote a bare [slow, fast] list instead of a mapping.
        items = value.items() if isinstance(value, dict) else [("AutoTokenizer", value)]
        for auto_class, target in items:
            for text in target if isinstance(target, list) else [target]:
                if isinstance(text, str) and text:
                    yield f"auto_map {auto_class}", text
    elif isinstance(value, dict):  # custom_pipelines: {task: {"impl": "module.Class"}}
        for task, spec in value.items():
            impl = spec.get("impl") if isinstance(spec, dict) else None
            if isinstance(impl, str) and impl:
                yield f"custom_pipelines {task}", impl


def _config_finding(folder: Path, name: str, refs: list[CodeRef], trusts: bool) -> Finding:
    parts = []
    evidence: dict[str, str] = {}
    for ref in refs:
        where = ref.where.removeprefix(name + " ")
        if ref.repo:
            state = f"code from the repository {ref.repo}, not scanned here"
        elif _safe_relative(ref.module_file) is None:
            state = "a path outside the repository"
        elif (folder / ref.module_file).is_file():
            state = "in this repository"
        else:
            state = "missing from this folder"
        parts.append(f"{where} -> {ref.cls} in {ref.module_file} ({state})")
        key = where if where not in evidence else f"{where} [{len(evidence)}]"
        evidence[key] = f"{ref.text} ({state})"
    if trusts:
        parts.append("trust_remote_code is set to true")
        evidence["trust_remote_code"] = "true"
    shown = "; ".join(parts[:_MAX_LISTED])
    more = f"; and {len(parts) - _MAX_LISTED} more" if len(parts) > _MAX_LISTED else ""
    message = (
        f"{name} asks for remote code, which loading with trust_remote_code=True runs: "
        f"{shown}{more}"
    )
    modules = sorted({r.module_file if not r.repo else f"{r.repo}/{r.module_file}" for r in refs})
    if modules:
        evidence["modules"] = ", ".join(modules)
    return _finding("TG1401", message, trigger=refs[0].text if refs else "", evidence=evidence)


# -- Python files ------------------------------------------------------------------


def _import_closure(folder: Path, start: list[str]) -> dict[str, str]:
    """Files that the modules ``start`` import relatively, transitively: {file: importer}."""
    seen = set(start)
    found: dict[str, str] = {}
    todo = list(start)
    while todo and len(seen) < _MAX_PY_FILES:
        rel = todo.pop()
        text, _ = _read_source(folder / rel)
        for target in _relative_imports(rel, text):
            if target not in seen and (folder / target).is_file():
                seen.add(target)
                found[target] = rel
                todo.append(target)
    return found


def _relative_imports(rel: str, text: str) -> Iterator[str]:
    """Repository-relative files named by ``from .x import y`` lines of ``rel``."""
    here = Path(rel).parent
    for m in _REL_FROM.finditer(text):
        base = here
        for _ in range(len(m.group(1)) - 1):
            base = base.parent
        module = m.group(2)
        if module:
            yield from _module_files(base, module)
        else:  # from . import a, b: each name may be a module
            for name in m.group(3).strip("()\\ \t").split(","):
                word = name.strip().split(" ")[0]
                if word.isidentifier():
                    yield from _module_files(base, word)
    for m in _REL_IMPORT.finditer(text):
        yield from _module_files(here, m.group(1))


def _module_files(base: Path, module: str) -> Iterator[str]:
    stem = base.joinpath(*module.split("."))
    for candidate in (f"{stem}.py", str(stem / "__init__.py")):
        rel = _safe_relative(candidate)
        if rel is not None:
            yield rel


def _safe_relative(rel: str) -> str | None:
    """``rel`` normalised, or None if it is absolute or climbs out of the repository."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return None
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(("..", "/")):
        return None
    return norm


def _read_source(path: Path) -> tuple[str, bool]:
    """The file's first bytes as text, and whether it was longer than the cap."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SOURCE + 1)
    except OSError:
        return "", False
    return raw[:_MAX_SOURCE].decode("utf-8", "replace"), len(raw) > _MAX_SOURCE


def _python_note(
    folder: Path, rel: str, refs: list[CodeRef] | None, importer: str | None
) -> RepoFile:
    text, cut = _read_source(folder / rel)
    note = RepoFile("python")
    calls = _dangerous_lines(text)
    if refs:
        classes = ", ".join(dict.fromkeys(f"{r.where} -> {r.cls}" for r in refs[:_MAX_LISTED]))
        note.findings.append(
            _finding(
                "TG1402",
                f"Python code that runs when the repository is loaded with "
                f"trust_remote_code=True ({classes})",
                trigger=refs[0].text,
                evidence={"classes": ", ".join(dict.fromkeys(r.cls for r in refs))},
            )
        )
    elif importer is not None:
        note.findings.append(
            _finding(
                "TG1403",
                f"Python code imported by {importer}, which a config points to: it runs "
                "too when the repository is trusted",
                trigger=importer,
            )
        )
    else:
        extra = f"; it {calls[0][0]} (line {calls[0][1]})" if calls else ""
        note.findings.append(
            _finding(
                "TG1404",
                f"Python file that no config points to: loading the model does not run it{extra}",
            )
        )
    if calls and (refs or importer is not None):
        what, line, excerpt = calls[0]
        note.findings.append(
            _finding(
                "TG1405",
                f"code that runs when trusted {what}: line {line}: {excerpt}",
                trigger=excerpt,
                evidence={f"line {n}": f"{w}: {e}" for w, n, e in calls},
            )
        )
    if cut:
        note.findings.append(
            _finding(
                "TG002",
                f"Python file longer than {_MAX_SOURCE:,} bytes: only its start was searched "
                "for imports and calls",
            )
        )
    return note


def _dangerous_lines(text: str) -> list[tuple[str, int, str]]:
    """``(what, line number, excerpt)`` for lines that run commands or dynamic code."""
    hits: list[tuple[str, int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        for what, pattern in _DANGEROUS:
            if pattern.search(stripped):
                hits.append((what, number, stripped[:160]))
                break
        if len(hits) >= _MAX_CALLS:
            break
    return hits


def _finding(
    rule_id: str, message: str, *, trigger: str = "", evidence: dict[str, str] | None = None
) -> Finding:
    return finding(rule_id, message, trigger=trigger, evidence=evidence or {})
