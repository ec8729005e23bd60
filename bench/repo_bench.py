"""Scan a mixed model repository of about 1 GB with every scanner: wall time, memory, verdicts.

The repository looks like a Hugging Face model repository: two safetensors shards
with their index, a PyTorch checkpoint (torch.save zip), a GGUF file with a chat
template, an ONNX model, tokenizer and generation configs, a README.  The same
folder is scanned clean, then with one planted pickle (``optimizer.pt`` whose
payload would only create a canary file): a tool should pass the first and fail
the second.  Each tool scans the whole folder in one process, as a user would.

    python bench/repo_bench.py [--size 1G] [--repeat 3] [--tools trainguard,modelaudit,...]

Results go to stdout as a table; record them in docs/benchmarks.md with the
machine and date.  Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from _runner import human_size, machine_info, parse_size, run_measured  # noqa: E402
from _scanners import CLEAN, DETECTED, ERROR, Tool, all_tools  # noqa: E402

TOOLS = ("trainguard", "modelaudit", "modelscan", "picklescan")
_CHUNK = 1 << 20


def _safetensors_shard(path: Path, names: list[str], floats_each: int) -> dict[str, str]:
    """A safetensors file of float32 tensors; content is a repeated pseudo-random block."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = floats_each * 4
        header[name] = {
            "dtype": "F32",
            "shape": [floats_each],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(_CHUNK)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            n = min(left, _CHUNK)
            f.write(block[:n])
            left -= n
    return {name: path.name for name in names}


def build_repository(root: Path, size: int, canary: Path) -> None:
    from trainguard.samples import BENIGN
    from trainguard.samples.large import build_large_torch_checkpoint

    root.mkdir(parents=True)
    shard_bytes = int(size * 0.38)
    per_tensor = 16 << 20
    weight_map: dict[str, str] = {}
    for shard in (1, 2):
        count = max(1, shard_bytes // per_tensor)
        names = [f"model.layers.{shard * 100 + i}.mlp.weight" for i in range(count)]
        path = root / f"model-0000{shard}-of-00002.safetensors"
        weight_map.update(_safetensors_shard(path, names, per_tensor // 4))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * shard_bytes}, "weight_map": weight_map})
    )
    build_large_torch_checkpoint(root / "pytorch_model.bin", int(size * 0.22))
    scratch = root.parent / "samples"
    scratch.mkdir(exist_ok=True)
    for sample_id, name in (
        ("gguf-llama3-template", "model-q8.gguf"),
        ("onnx-add-relu", "model.onnx"),
        ("tokenizer-config-chatml", "tokenizer_config.json"),
    ):
        built = Path(BENIGN[sample_id].build(scratch, canary))
        shutil.copyfile(built, root / name)
    (root / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4096,
                "num_hidden_layers": 32,
                "torch_dtype": "float32",
            }
        )
    )
    (root / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.9}))
    vocab = {f"tok{i}": i for i in range(50_000)}
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": vocab}}))
    (root / "README.md").write_text("# demo-model\n\nA benchmark repository.\n")


def poison(clean: Path, poisoned: Path, canary: Path) -> None:
    """The same repository (large files hard-linked) plus a planted optimizer.pt."""
    from trainguard.samples import MALICIOUS

    poisoned.mkdir()
    for entry in clean.iterdir():
        os.link(entry, poisoned / entry.name)
    scratch = poisoned.parent / "planted"
    scratch.mkdir(exist_ok=True)
    built = Path(MALICIOUS["torch-save-reduce"].build(scratch, canary))
    shutil.copyfile(built, poisoned / "optimizer.pt")


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _scan(tool: Tool, path: Path, timeout: float) -> tuple[str, float, int, str]:
    with tempfile.TemporaryDirectory(prefix=f"tg-repo-{tool.name}-") as tmp:
        child = run_measured(
            tool.argv(path, Path(tmp)), timeout=timeout, cwd=Path(tmp), env=tool.env
        )
        if child.timed_out:
            return ERROR, child.seconds, child.peak_rss_bytes, f"timeout after {timeout:.0f} s"
        verdict = tool.read(child, Path(tmp))
    return verdict.status, child.seconds, child.peak_rss_bytes, verdict.detail


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="1G", help="total size of the repository (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="clean scans per tool (median counts)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--peers-venv", type=Path, default=BENCH / ".venv-peers")
    ap.add_argument("--trainguard-python", default=sys.executable)
    args = ap.parse_args(argv)
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    tg_env = dict(os.environ)
    tg_env.pop("PYTHONDONTWRITEBYTECODE", None)  # as for any installed package
    tg_env["PYTHONPATH"] = str(REPO / "src")
    tools = all_tools(args.peers_venv, args.trainguard_python, tg_env)
    unknown = [t for t in wanted if t not in tools]
    if unknown:
        ap.error(f"unknown tool(s): {', '.join(unknown)}")
    if (
        any(not t.startswith("trainguard") for t in wanted)
        and not (args.peers_venv / "bin" / "python").exists()
    ):
        print(f"no peers venv at {args.peers_venv}: run `make bench-peers`", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tg-repo-bench-") as tmp:
        base = Path(tmp)
        canary = base / "canary"
        clean, poisoned = base / "clean" / "demo-model", base / "poisoned" / "demo-model"
        clean.parent.mkdir()
        poisoned.parent.mkdir()
        built_at = time.perf_counter()
        build_repository(clean, parse_size(args.size), canary)
        poison(clean, poisoned, canary)
        total = _tree_size(clean)
        files = sum(1 for p in clean.iterdir())
        print(
            f"repository: {files} files, {human_size(total)} "
            f"(built in {time.perf_counter() - built_at:.1f} s); "
            f"poisoned copy adds optimizer.pt",
            file=sys.stderr,
        )
        rows = []
        for name in wanted:
            tool = tools[name]
            clean_runs = [_scan(tool, clean, args.timeout) for _ in range(max(1, args.repeat))]
            status, _, _, detail = clean_runs[-1]
            seconds = statistics.median(r[1] for r in clean_runs)
            peak = max(r[2] for r in clean_runs)
            p_status, p_seconds, _, p_detail = _scan(tool, poisoned, args.timeout)
            ran = canary.exists()
            canary.unlink(missing_ok=True)
            rows.append((name, status, seconds, peak, p_status, p_seconds, ran, detail, p_detail))
            print(f"  {name}: clean {status} {seconds:.2f} s, poisoned {p_status}", file=sys.stderr)

    info = machine_info()
    print(f"# mixed repository scan, {human_size(total)} in {files} files")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores; {when}")
    print()
    print(
        "| tool | clean repo: verdict | wall (median) | peak RSS | poisoned repo: verdict | wall |"
    )
    print("|---|---|---|---|---|---|")
    tg_time = next((r[2] for r in rows if r[0] == "trainguard"), None)
    for name, status, seconds, peak, p_status, p_seconds, ran, _, _ in rows:
        ratio = f" ({seconds / tg_time:.1f}x)" if tg_time and name != "trainguard" else ""
        ok = {CLEAN: "clean", DETECTED: "FLAGGED", ERROR: "error"}
        p_ok = {CLEAN: "MISSED", DETECTED: "detected", ERROR: "error"}
        print(
            f"| {name} | {ok.get(status, status)} | {seconds:.2f} s{ratio} | "
            f"{human_size(peak)} | {p_ok.get(p_status, p_status)}"
            f"{' (payload ran!)' if ran else ''} | {p_seconds:.2f} s |"
        )
    print()
    for name, _, _, _, _, _, _, detail, p_detail in rows:
        print(f"- {name}: clean: {detail or '-'}; poisoned: {p_detail or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
