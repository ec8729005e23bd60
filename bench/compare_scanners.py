"""Side-by-side benchmark: trainguard against picklescan, modelscan, fickling and modelaudit.

Builds the sample corpus from ``trainguard.samples`` into a temporary folder, adds
large benign files for speed, runs every tool on every file (one subprocess
each, sequentially, with a per-file timeout) and prints per-tool tables and a
per-sample matrix.  Run it with the trainguard venv; the peers come from
``bench/.venv-peers`` (see ``bench/README.md``)::

    /work/main/.venv/bin/python bench/compare_scanners.py --json bench-results.json
    /work/main/.venv/bin/python bench/compare_scanners.py --quick

How a result is classified (per tool: see ``_scanners.py`` for how each is read):

* detected - the tool says unsafe (for trainguard: exit 1 at the default ``--fail-on``);
* clean    - the tool says safe;
* error    - anything else: crash, timeout, "unsupported file", parse failure.

On a malicious sample, error counts as a miss.  On a benign sample only "detected"
is a false positive; errors are counted in their own column.  Benign samples that
trainguard expects to rate ``medium`` are benign here: at the default fail level
(high) they must not fail the scan.

Every malicious sample writes a canary file if its payload ever runs; after each
scan the benchmark checks the canary, so a tool that executed a payload shows up
with ``!`` in the matrix (none should: the payloads only create that file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _native import native_numpy_pickle, native_torch_checkpoint  # noqa: E402
from _runner import human_size, machine_info, parse_size, run_measured  # noqa: E402
from _scanners import CLEAN, DETECTED, ERROR, Tool, all_tools, modelscan_venv  # noqa: E402

if importlib.util.find_spec("trainguard") is None:
    sys.path.insert(0, str(REPO / "src"))

TOOL_ORDER = [
    "trainguard",
    "trainguard-strict",
    "picklescan",
    "modelscan",
    "fickling",
    "fickling-api",
    "modelaudit",
]
# Column heads of the per-sample matrix, which would not fit a screen otherwise.
SHORT = {"trainguard": "tg", "trainguard-strict": "tg-strict", "fickling-api": "fickl-api"}
PEER_PACKAGES = [
    "picklescan",
    "modelscan",
    "fickling",
    "modelaudit",
    "modelaudit-picklescan",
    "torch",
    "numpy",
    "py7zr",
    "lz4",
    "joblib",
    "scikit-learn",
    "h5py",
    "onnx",
    "safetensors",
    "gguf",
]


@dataclass
class Item:
    """One file of the corpus."""

    id: str
    path: Path
    malicious: bool
    expect: str
    kind: str  # "sample" or "large"
    canary: Path | None
    size: int = 0
    title: str = ""
    fires: bool = False  # the sample's own claim that its payload runs under its loader


@dataclass
class Run:
    tool: str
    item: str
    status: str
    severity: str
    detail: str
    seconds: float
    peak_rss_bytes: int
    returncode: int
    timed_out: bool
    payload_ran: bool
    stdout_tail: str = ""
    stderr_tail: str = ""


@dataclass
class Skipped:
    id: str
    reason: str


@dataclass
class Corpus:
    items: list[Item] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


# -- corpus -------------------------------------------------------------------


def _missing_requirements(requires: Sequence[str]) -> list[str]:
    return [name for name in requires if importlib.util.find_spec(name) is None]


def _listed(table: object) -> list[Any]:
    # The registries are dicts keyed by id; accept a plain sequence of samples too.
    if isinstance(table, Mapping):
        return list(table.values())
    if isinstance(table, Iterable):
        return list(table)
    raise TypeError(f"not a sample registry: {type(table).__name__}")


def _large_builders(samples: Any, size: int) -> list[tuple[str, str, Any]]:
    """(id, file name, builder) of each large benign file.

    The streaming builders of ``trainguard.samples`` first, then the same content
    written by torch.save / pickle.dump (``_native.py`` says why both).
    """
    label = human_size(size).replace(" ", "").replace(".0", "")
    builders: list[tuple[str, str, Any]] = [
        (f"large-torch-{label}", "large_model.pt", samples.build_large_torch_checkpoint),
        (f"large-numpy-pickle-{label}", "large_array.pkl", samples.build_large_numpy_pickle),
    ]
    if importlib.util.find_spec("torch") is not None:
        builders.append((f"large-torch-save-{label}", "torch_save.pt", native_torch_checkpoint))
    if importlib.util.find_spec("numpy") is not None:
        builders.append((f"large-pickle-dump-{label}", "pickle_dump.pkl", native_numpy_pickle))
    return builders


def build_corpus(root: Path, large_bytes: int, with_large: bool) -> Corpus:
    from trainguard import samples

    corpus = Corpus()
    canaries = root / "canaries"
    canaries.mkdir(parents=True)
    for sample in [*_listed(samples.MALICIOUS), *_listed(samples.BENIGN)]:
        missing = _missing_requirements(tuple(getattr(sample, "requires", ()) or ()))
        if missing:
            corpus.skipped.append(Skipped(sample.id, "needs " + ", ".join(missing)))
            continue
        out_dir = root / "samples" / sample.id
        out_dir.mkdir(parents=True)
        canary = canaries / f"{sample.id}.canary"
        try:
            path = Path(sample.build(out_dir, canary))
        except Exception as exc:  # one broken sample must not stop the run
            corpus.skipped.append(Skipped(sample.id, f"build failed: {type(exc).__name__}: {exc}"))
            continue
        if canary.exists():
            # Building must never fire a payload; if it did, say so and start clean
            # so that the first tool is not blamed for it.
            print(f"warning: building {sample.id} created its canary", file=sys.stderr)
            canary.unlink()
        corpus.items.append(
            Item(
                id=sample.id,
                path=path,
                malicious=bool(sample.malicious),
                expect=str(sample.expect),
                kind="sample",
                canary=canary,
                size=_size(path),
                title=str(getattr(sample, "title", "")),
                fires=bool(getattr(sample, "fires", True)),
            )
        )
    if with_large:
        large = root / "large"
        large.mkdir()
        for item_id, name, build in _large_builders(samples, large_bytes):
            print(f"building {item_id} ...", file=sys.stderr)
            path = large / name
            built = Path(build(path, large_bytes) or path)
            corpus.items.append(
                Item(item_id, built, False, "clean", "large", None, size=_size(built))
            )
    return corpus


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# -- running ------------------------------------------------------------------


def run_one(tool: Tool, item: Item, timeout: float) -> Run:
    with tempfile.TemporaryDirectory(prefix=f"tg-bench-{tool.name}-") as tmp:
        scratch = Path(tmp)
        child = run_measured(
            tool.argv(item.path, scratch), timeout=timeout, cwd=scratch, env=tool.env
        )
        if child.timed_out:
            status, severity, detail = ERROR, "", f"timeout after {timeout:.0f} s"
        else:
            verdict = tool.read(child, scratch)
            status, severity, detail = verdict.status, verdict.severity, verdict.detail
    ran = item.canary is not None and item.canary.exists()
    if ran and item.canary is not None:
        item.canary.unlink()  # so the next tool starts from a clean slate
    return Run(
        tool=tool.name,
        item=item.id,
        status=status,
        severity=severity,
        detail=detail,
        seconds=child.seconds,
        peak_rss_bytes=child.peak_rss_bytes,
        returncode=child.returncode,
        timed_out=child.timed_out,
        payload_ran=ran,
        stdout_tail=child.stdout[-2000:],
        stderr_tail=child.stderr[-2000:],
    )


def run_all(tools: list[Tool], corpus: Corpus, timeout: float, repeat: int) -> list[Run]:
    runs: list[Run] = []
    total = len(tools) * len(corpus.items)
    if corpus.items:
        # One discarded run per tool first, so that nobody's first file pays for
        # compiling bytecode caches or reading the tool's own files from disk.
        for tool in tools:
            run_one(tool, corpus.items[0], timeout)
    done = 0
    for item in corpus.items:
        # Same order of tools for every file; the file sits in the page cache after
        # it was built, so no tool pays for a cold read the others skip.
        for tool in tools:
            tries = [
                run_one(tool, item, timeout) for _ in range(repeat if item.kind == "large" else 1)
            ]
            best = min(tries, key=lambda r: r.seconds)
            runs.append(best)
            done += 1
            print(
                f"[{done}/{total}] {tool.name:<17} {item.id:<40} {best.status:<8} "
                f"{best.seconds:7.2f}s",
                file=sys.stderr,
            )
    return runs


# -- reporting ----------------------------------------------------------------


def _fmt_ratio(value: float, base: float) -> str:
    if base <= 0:
        return "-"
    return f"{value / base:.1f}x"


_LARGE_CELL = {DETECTED: "FP", CLEAN: "ok", ERROR: "err"}


def _cell(run: Run | None, item: Item) -> str:
    if run is None:
        return "n/a"
    if run.timed_out:
        text = "T/O"
    elif run.status == ERROR:
        text = "err"
    elif item.malicious:
        text = "hit" if run.status == DETECTED else "MISS"
    else:
        text = "FP" if run.status == DETECTED else "ok"
    return text + ("!" if run.payload_ran else "")


@dataclass
class LargeResult:
    seconds: float
    peak_rss_bytes: int
    status: str
    timed_out: bool


@dataclass
class Summary:
    detected: int
    malicious: int
    false_positives: int
    benign: int
    errors_malicious: int
    errors_benign: int
    timeouts: int
    payload_ran: int
    corpus_seconds: float
    median_seconds: float
    large: dict[str, LargeResult]


def summarize(tools: list[str], corpus: Corpus, runs: list[Run]) -> dict[str, Summary]:
    by = {(r.tool, r.item): r for r in runs}
    samples = [i for i in corpus.items if i.kind == "sample"]
    mal = [i for i in samples if i.malicious]
    ben = [i for i in samples if not i.malicious]
    large = [i for i in corpus.items if i.kind == "large"]
    out: dict[str, Summary] = {}
    for t in tools:
        mine = [by[(t, i.id)] for i in samples]
        out[t] = Summary(
            detected=sum(1 for i in mal if by[(t, i.id)].status == DETECTED),
            malicious=len(mal),
            false_positives=sum(1 for i in ben if by[(t, i.id)].status == DETECTED),
            benign=len(ben),
            errors_malicious=sum(1 for i in mal if by[(t, i.id)].status == ERROR),
            errors_benign=sum(1 for i in ben if by[(t, i.id)].status == ERROR),
            timeouts=sum(1 for r in mine if r.timed_out),
            payload_ran=sum(1 for r in mine if r.payload_ran),
            corpus_seconds=sum(r.seconds for r in mine),
            median_seconds=statistics.median([r.seconds for r in mine]) if mine else 0.0,
            large={
                i.id: LargeResult(
                    seconds=by[(t, i.id)].seconds,
                    peak_rss_bytes=by[(t, i.id)].peak_rss_bytes,
                    status=by[(t, i.id)].status,
                    timed_out=by[(t, i.id)].timed_out,
                )
                for i in large
            },
        )
    return out


# Sample ids start with their format; compressed and archived wrappers form one family.
_WRAPPERS = {"7z", "bz2", "gzip", "xz", "tar", "zip"}


def family(sample_id: str) -> str:
    head = sample_id.split("-", 1)[0]
    return "wrapped" if head in _WRAPPERS else head


def _family_tables(tools: list[str], corpus: Corpus, runs: list[Run]) -> list[str]:
    """Detection and false positives per format family: the peers do not all claim
    every format, and a total over all of them would hide where each one is strong."""
    by = {(r.tool, r.item): r for r in runs}
    samples = [i for i in corpus.items if i.kind == "sample"]
    fams = sorted({family(i.id) for i in samples})
    heads = " ".join(f"{SHORT.get(t, t)[:10]:>10}" for t in tools)
    out: list[str] = []
    for title, malicious in (("detected", True), ("false positives", False)):
        out += ["", f"## By family: {title} (x/N)", ""]
        hdr = f"{'family':<12} {heads}"
        out += [hdr, "-" * len(hdr)]
        for fam in fams:
            group = [i for i in samples if family(i.id) == fam and i.malicious == malicious]
            if not group:
                continue
            cells = []
            for t in tools:
                n = sum(1 for i in group if by[(t, i.id)].status == DETECTED)
                cells.append(f"{n}/{len(group)}")
            out.append(f"{fam:<12} " + " ".join(f"{c:>10}" for c in cells))
    return out


# Formats every peer claims (pickle and what wraps it): the common ground.
PICKLE_FAMILIES = {"gadget", "pickle", "torch", "joblib", "numpy", "sklearn", "wrapped"}


def _detection_table(tools: list[str], summary: dict[str, Summary]) -> list[str]:
    lines: list[str] = []
    base = summary.get("trainguard")
    hdr = f"{'tool':<17} {'detected':>10} {'false pos':>10} {'err mal':>8} {'err ben':>8} "
    hdr += f"{'corpus s':>9} {'median s':>9} {'vs tg':>6}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for t in tools:
        s = summary[t]
        det = f"{s.detected}/{s.malicious}"
        fp = f"{s.false_positives}/{s.benign}"
        ratio = _fmt_ratio(s.corpus_seconds, base.corpus_seconds) if base else "-"
        lines.append(
            f"{t:<17} {det:>10} {fp:>10} {s.errors_malicious:>8} {s.errors_benign:>8} "
            f"{s.corpus_seconds:>9.1f} {s.median_seconds:>9.2f} {ratio:>6}"
        )
    return lines


def render(tools: list[str], corpus: Corpus, runs: list[Run], summary: dict[str, Summary]) -> str:
    base = summary.get("trainguard")
    lines = ["## Detection and false positives (corpus of small samples)", ""]
    lines += _detection_table(tools, summary)
    lines.append("")
    lines.append("detected: malicious samples flagged (an error is a miss); false pos: benign")
    lines.append("samples flagged; err mal / err ben: errors, timeouts or 'unsupported' on")
    lines.append("malicious / benign samples; corpus s: total wall time over all samples, one")
    lines.append("process per file (interpreter start-up included); median s: per file;")
    lines.append("vs tg: corpus time / trainguard's (above 1.0x: slower than trainguard).")
    ran = [t for t in tools if summary[t].payload_ran]
    if ran:
        lines.append("PAYLOAD RAN under: " + ", ".join(ran))

    pickles = Corpus(
        items=[i for i in corpus.items if i.kind == "sample" and family(i.id) in PICKLE_FAMILIES]
    )
    if pickles.items and len(pickles.items) < sum(1 for i in corpus.items if i.kind == "sample"):
        lines += ["", "## The same, pickle-based formats only", ""]
        lines.append("Families " + ", ".join(sorted(PICKLE_FAMILIES)) + ": the formats every")
        lines.append(
            "peer claims. Elsewhere (GGUF, ONNX, safetensors, Keras, TensorFlow) fickling's"
        )
        lines.append("'detections' are its verdict on any file that is not a valid pickle.")
        lines.append("")
        lines += _detection_table(tools, summarize(tools, pickles, runs))

    lines.extend(_family_tables(tools, corpus, runs))

    large = [i for i in corpus.items if i.kind == "large"]
    if large:
        lines.append("")
        lines.append("## Large benign files (time per file, peak RSS of the scanner process)")
        lines.append("")
        lines.append("large-torch / large-numpy-pickle: written by trainguard.samples (streamed,")
        lines.append("no pickle memo); large-torch-save / large-pickle-dump: the same kind of")
        lines.append("content written by torch.save / pickle.dump.")
        for item in large:
            lines.append("")
            lines.append(f"### {item.id} ({human_size(item.size)})")
            lines.append("")
            hdr = f"{'tool':<17} {'seconds':>9} {'peak RSS':>10} {'vs tg':>6} {'result':>7}"
            lines.append(hdr)
            lines.append("-" * len(hdr))
            for t in tools:
                info = summary[t].large[item.id]
                tg = base.large[item.id] if base else None
                ratio = _fmt_ratio(info.seconds, tg.seconds) if tg else "-"
                res = "T/O" if info.timed_out else _LARGE_CELL[info.status]
                lines.append(
                    f"{t:<17} {info.seconds:>9.2f} {human_size(info.peak_rss_bytes):>10}"
                    f" {ratio:>6} {res:>7}"
                )

    lines.append("")
    lines.append("## Per-sample matrix")
    lines.append("")
    lines.append("hit/MISS on malicious samples, ok/FP on benign ones, err = error or")
    lines.append("unsupported (a miss on a malicious sample), T/O = timeout, ! = payload ran.")
    lines.append("")
    by = {(r.tool, r.item): r for r in runs}
    width = max([len(i.id) for i in corpus.items] + [10])
    heads = " ".join(f"{SHORT.get(t, t)[:10]:>10}" for t in tools)
    hdr = f"{'sample':<{width}} {'mal':>3} {'expect':>8} {heads}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for item in sorted(
        (i for i in corpus.items if i.kind == "sample"), key=lambda i: (not i.malicious, i.id)
    ):
        cells = " ".join(f"{_cell(by.get((t, item.id)), item):>10}" for t in tools)
        mark = "yes" if item.malicious else "no"
        lines.append(f"{item.id:<{width}} {mark:>3} {item.expect:>8} {cells}")
    if corpus.skipped:
        lines.append("")
        lines.append("Samples not built (not counted anywhere):")
        for skip in corpus.skipped:
            lines.append(f"  {skip.id}: {skip.reason}")

    tg_runs = [r for r in runs if r.tool == "trainguard"]
    items = {i.id: i for i in corpus.items}
    wrong = [
        r
        for r in tg_runs
        if (items[r.item].malicious and r.status != DETECTED)
        or (not items[r.item].malicious and r.status != CLEAN)
    ]
    if tg_runs:
        lines.append("")
        lines.append("## trainguard misses, false alarms and errors")
        lines.append("")
        if not wrong:
            lines.append("none")
        for r in wrong:
            item = items[r.item]
            what = (
                ("MISS" if r.status == CLEAN else "error on malicious")
                if item.malicious
                else ("FALSE POSITIVE" if r.status == DETECTED else "error on benign")
            )
            lines.append(
                f"  {r.item} (expect {item.expect}): {what}; verdict={r.severity or 'none'} "
                f"exit={r.returncode} {r.detail}"
            )
    return "\n".join(lines)


# -- versions -----------------------------------------------------------------


def peer_versions(venv: Path, packages: Sequence[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))\n"
    )
    py = venv / "bin" / "python"
    try:
        res = subprocess.run(
            [str(py), "-c", code, *packages], capture_output=True, text=True, timeout=60
        )
        versions: dict[str, str] = json.loads(res.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    return versions


def trainguard_version(python: str, env: dict[str, str]) -> str:
    code = (
        "import importlib.metadata as m\ntry:\n print(m.version('trainguard'))\nexcept Exception:\n"
    )
    code += " import trainguard; print(getattr(trainguard, '__version__', 'unknown'))\n"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return res.stdout.strip() or "unknown"


# -- main ---------------------------------------------------------------------


def report_text(meta: dict[str, Any], corpus: Corpus, runs: list[Run], names: list[str]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(float(meta["started"])))
    load_before, load_after = meta["loadavg_before_after"]
    large = int(meta["large_bytes"])
    head = [
        f"# trainguard scanner benchmark, {when}",
        "",
        "machine: " + ", ".join(f"{k}={v}" for k, v in meta["machine"].items()),
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        # Other work on the machine skews every timing; the load average says if there was any.
        f"load average (1 min) before / after the scans: {load_before} / {load_after}",
        f"per-file timeout: {float(meta['timeout']):.0f} s; large files: "
        + (f"{human_size(large)} each" if large else "none"),
        "",
    ]
    return "\n".join([*head, render(names, corpus, runs, summarize(names, corpus, runs))])


def load_results(path: Path) -> tuple[dict[str, Any], Corpus, list[Run], list[str]]:
    """Read back what ``--json`` wrote, to print the report again without rescanning."""
    doc = json.loads(path.read_text())
    corpus = Corpus()
    for raw in doc["items"]:
        fields = dict(raw)
        fields["path"] = Path(fields["path"])
        fields["canary"] = Path(fields["canary"]) if fields.get("canary") else None
        corpus.items.append(Item(**fields))
    corpus.skipped = [Skipped(**s) for s in doc.get("skipped", [])]
    runs = [Run(**r) for r in doc["runs"]]
    names = list(dict.fromkeys(r.tool for r in runs))
    meta = {k: doc[k] for k in ("started", "machine", "versions", "timeout", "large_bytes")}
    meta["loadavg_before_after"] = doc.get("loadavg_before_after", ["?", "?"])
    return meta, corpus, runs, names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="large files of 50M instead of 500M")
    ap.add_argument("--large-size", default=None, help="size of each large file (default 500M)")
    ap.add_argument("--no-large", action="store_true", help="skip the large files")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per file and tool")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per large file (the fastest counts)"
    )
    ap.add_argument("--tools", default=",".join(TOOL_ORDER), help="comma-separated subset")
    ap.add_argument("--peers-venv", type=Path, default=BENCH / ".venv-peers")
    ap.add_argument("--trainguard-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=None, help="write raw results here")
    ap.add_argument("--keep", type=Path, default=None, help="build the corpus here and keep it")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="print the report of an earlier --json run"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        print(report_text(*load_results(args.from_json)))
        return 0

    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TOOL_ORDER]
    if unknown:
        ap.error(f"unknown tool(s): {', '.join(unknown)}; known: {', '.join(TOOL_ORDER)}")
    large_bytes = parse_size(args.large_size or ("50M" if args.quick else "500M"))
    peers = [t for t in wanted if not t.startswith("trainguard")]
    if peers and not (args.peers_venv / "bin" / "python").exists():
        print(f"no peers venv at {args.peers_venv}: see bench/README.md", file=sys.stderr)
        return 2

    tg_env = dict(os.environ)
    # Bytecode caching on, as for any installed package: with it off, every
    # trainguard process recompiles its (editable, source-tree) modules.
    tg_env.pop("PYTHONDONTWRITEBYTECODE", None)
    src = str(REPO / "src")
    tg_env["PYTHONPATH"] = src + (
        os.pathsep + tg_env["PYTHONPATH"] if tg_env.get("PYTHONPATH") else ""
    )
    tools_by_name = all_tools(args.peers_venv, args.trainguard_python, tg_env)
    tools = [tools_by_name[t] for t in TOOL_ORDER if t in wanted]

    root = args.keep or Path(tempfile.mkdtemp(prefix="tg-bench-corpus-"))
    if args.keep:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
    try:
        started = time.time()
        corpus = build_corpus(root, large_bytes, with_large=not args.no_large)
        print(
            f"corpus: {sum(1 for i in corpus.items if i.kind == 'sample')} samples, "
            f"{len(corpus.skipped)} skipped, large files: {human_size(large_bytes)} each",
            file=sys.stderr,
        )
        load_before = _loadavg()
        runs = run_all(tools, corpus, args.timeout, max(1, args.repeat))
        load_after = _loadavg()
        names = [t.name for t in tools]
        summary = summarize(names, corpus, runs)
        versions = {"trainguard": trainguard_version(args.trainguard_python, tg_env)}
        if peers:
            versions.update(peer_versions(args.peers_venv, PEER_PACKAGES))
            own = modelscan_venv(args.peers_venv)
            if own != args.peers_venv:
                ms = peer_versions(own, ["modelscan", "numpy", "h5py"])
                versions["modelscan"] = (
                    f"{ms['modelscan']} (own venv: numpy {ms['numpy']}, h5py {ms['h5py']})"
                )
        meta: dict[str, Any] = {
            "started": started,
            "machine": machine_info(),
            "versions": versions,
            "timeout": args.timeout,
            "loadavg_before_after": [load_before, load_after],
            "large_bytes": 0 if args.no_large else large_bytes,
        }
        print(report_text(meta, corpus, runs, names))
        if args.json:
            doc = {
                **meta,
                "items": [
                    {
                        **asdict(i),
                        "path": str(i.path),
                        "canary": str(i.canary) if i.canary else None,
                    }
                    for i in corpus.items
                ],
                "skipped": [asdict(s) for s in corpus.skipped],
                "runs": [asdict(r) for r in runs],
                "summary": {t: asdict(v) for t, v in summary.items()},
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\nraw results: {args.json}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
