"""``trainguard rules``: the rule ids a finding can carry (``--markdown`` writes docs/rules.md)."""

from __future__ import annotations

import argparse
import sys

from trainguard.cli._common import EXIT_OK, Subparsers


def register(sub: Subparsers) -> None:
    r = sub.add_parser(
        "rules",
        help="list the rule ids findings can carry",
        description="List every rule id with its default severity and title, so that a "
        "policy can change or suppress one knowingly. --markdown prints docs/rules.md.",
    )
    r.add_argument("--markdown", action="store_true", help="as docs/rules.md")
    r.set_defaults(handler=_rules)


def _rules(args: argparse.Namespace) -> int:
    from trainguard.rules import RULES, rules_markdown

    if args.markdown:
        sys.stdout.write(rules_markdown())
    else:
        for r in RULES.values():
            print(f"{r.id}  {r.severity!s:8}  {r.title}")
    return EXIT_OK
