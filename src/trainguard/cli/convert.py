"""``trainguard convert``: a pickle checkpoint to safetensors plus JSON, loaded safely."""

from __future__ import annotations

import argparse
import sys

from trainguard.cli._common import EXIT_OK, Subparsers, add_verdict, load_policy, loader_strict


def register(sub: Subparsers) -> None:
    c = sub.add_parser(
        "convert",
        help="convert a pickle checkpoint to safetensors plus JSON, loading it safely",
        description="Load IN with trainguard's allowlist unpickler (the file is scanned "
        "first and refused if it holds a payload: exit 1), then write its tensors to "
        "OUT.safetensors and everything else to OUT.json. Nothing in IN is executed.",
    )
    c.add_argument("src", metavar="IN", help="the pickle checkpoint (torch.save, pickle)")
    c.add_argument("out", metavar="OUT", help="output base name (OUT.safetensors, OUT.json)")
    c.add_argument("--policy", metavar="FILE", help="TOML policy (docs/policy.md)")
    add_verdict(c)
    c.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from trainguard.loader.convert import convert

    policy = load_policy(args.policy)
    st, js = convert(args.src, args.out, policy=policy, strict=loader_strict(args))
    print(f"wrote {st} and {js}", file=sys.stderr)
    return EXIT_OK
