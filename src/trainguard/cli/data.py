"""``trainguard data seal`` and ``data verify``: signed manifests of datasets.

A thin layer over :mod:`trainguard.data.seal`: parse, call, render, return the
exit code (0 verified, 1 findings, 2 could not check).  Findings (TG1520 per
changed sample, TG1522 for the dataset as a whole) are rendered by the same
renderers as a scan's; status lines and the progress bar go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trainguard.cli._common import (
    EXIT_OK,
    Subparsers,
    add_output,
    byte_progress,
    human_size,
    no_progress_arg,
    private_key,
    public_key,
    show_progress,
    use_color,
    write_output,
)

if TYPE_CHECKING:
    from trainguard.findings import Finding


def register(sub: Subparsers) -> None:
    d = sub.add_parser(
        "data",
        help="seal a dataset (per-shard and per-sample digests) and verify it",
        description="Sealed data: a signed manifest of a dataset that SealedDataset reads "
        "samples through, and that replay and verify-run check each step's samples against "
        "(docs/data.md).",
    )
    verbs = d.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    s = verbs.add_parser(
        "seal",
        help="sign a manifest of a dataset folder or of shard files",
        description="Split every shard into samples (.npy rows, torch.save rows, JSONL lines, "
        "else one sample per file), digest each, and sign the manifest (a Sigstore bundle; "
        "per-sample digests in a .leaves file beside it).",
    )
    s.add_argument("paths", nargs="+", metavar="DIR_OR_FILES", help="one folder, or shard files")
    s.add_argument("--key", required=True, metavar="PRIVATE.pem", help="PEM private key")
    s.add_argument(
        "--signature",
        metavar="OUT",
        help="where to write the manifest (default: DIR/.trainguard-data.sig)",
    )
    s.add_argument("--name", help="the dataset's name in the manifest (default: the folder's)")
    no_progress_arg(s)
    s.set_defaults(handler=_seal)
    v = verbs.add_parser(
        "verify",
        help="check a dataset against its signed manifest",
        description="Verify the manifest's signature and its .leaves file, then every shard: "
        "a changed shard is split again and each changed sample named (TG1520); missing, "
        "added or unreadable shards are TG1522.",
    )
    v.add_argument("path", metavar="DIR", help="the dataset folder (or one of its files)")
    v.add_argument("--key", required=True, metavar="PUBLIC.pem", help="the signer's public key")
    v.add_argument("--signature", metavar="SIG", help="default: DIR/.trainguard-data.sig")
    v.add_argument(
        "--expect-digest",
        metavar="DIGEST",
        help="the dataset digest `data seal` printed: a seal of other data, or of an older "
        "version signed by the same key (a rollback), is TG1522",
    )
    add_output(v, ("text", "json", "sarif"))
    no_progress_arg(v)
    v.set_defaults(handler=_verify)


def _report(
    findings: Sequence[Finding],
    path: str,
    args: argparse.Namespace,
    sizes: dict[str, int] | None = None,
) -> int:
    """Findings grouped by shard (``sizes``: every sealed shard, listed even when clean)."""
    from trainguard.findings import FileResult, ScanReport
    from trainguard.render import render

    by_file: dict[str, list[Finding]] = {name: [] for name in sizes or {}}
    for f in findings:
        by_file.setdefault(f.file or path, []).append(f)
    report = ScanReport(
        [FileResult(n, "dataset shard", (sizes or {}).get(n, 0), fs) for n, fs in by_file.items()]
    )
    fmt = getattr(args, "format", "text")
    write_output(render(report, fmt, color=use_color(args)), getattr(args, "output", None))
    return report.exit_code()


def _seal(args: argparse.Namespace) -> int:
    from trainguard.data.seal import DataVerificationError, seal_dataset

    key = private_key(args.key)
    with byte_progress(show_progress(args), "sealing") as progress:
        try:
            result = seal_dataset(
                args.paths, key, signature=args.signature, name=args.name, progress=progress
            )
        except DataVerificationError as exc:
            print(f"trainguard: {exc}", file=sys.stderr)
            return _report(exc.findings, args.paths[0], args)
    m = result.manifest
    print(
        f"sealed {len(m.shards)} shard(s), {m.samples:,} samples "
        f"({human_size(sum(s.size for s in m.shards))}) -> {result.signature} "
        f"(+ {result.leaves.name}); manifest sha256 {m.digest}",
        file=sys.stderr,
    )
    # The anchor: a seal proves who signed, not which version. Pin this digest
    # (SealedDataset(expect_digest=), data verify --expect-digest, replay --expect-data).
    print(f"dataset digest {m.content}", file=sys.stderr)
    print(m.content)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from trainguard.data.seal import verify_report

    key = public_key(args.key)
    assert key is not None  # --key is required
    with byte_progress(show_progress(args), "verifying") as progress:
        result = verify_report(
            args.path,
            key,
            signature=args.signature,
            progress=progress,
            expect_digest=args.expect_digest,
        )
    m = result.manifest
    sizes = {s.name: s.size for s in m.shards} if m is not None else None
    code = _report(result.findings, args.path, args, sizes)
    if code == EXIT_OK and result.manifest is not None:
        print(
            f"verified {result.shards_checked} shard(s), {result.manifest.samples:,} samples "
            f"against the manifest (sha256 {result.manifest.digest[:16]}...); dataset digest "
            f"{result.manifest.content}",
            file=sys.stderr,
        )
    return code
