"""``trainguard verify-run``: recompute sampled segments of a run, beside it or after it."""

from __future__ import annotations

import argparse
import sys

from trainguard.cli._common import (
    EXIT_FINDINGS,
    Subparsers,
    add_ledger,
    add_output,
    add_run,
    ledger_url,
    run_id,
    write_output,
)
from trainguard.cli.anchors import add_anchors, pins_for
from trainguard.cli.ledger_show import printable
from trainguard.errors import UsageError

MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM private key is a few hundred bytes


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "verify-run",
        help="recompute segments of a run picked with a secret and sign the verdicts",
        description="A verifier beside training (see docs/verifier.md): follows the run's "
        "ledger and checkpoints, picks segments at random with a secret derived from its own "
        "key (the training process never sees it), replays each through the honest entry "
        "point, checks the next checkpoint against the replay, and writes signed verdicts to "
        "the chain RUN/verify of the same ledger. Each signed head of the run is verified as "
        "it is read; a history that does not verify is not recomputed (an alert names why). "
        "Exit 0 every checked segment matched, 1 a divergence, an unrecorded checkpoint or a "
        "ledger that does not verify, 2 error.",
    )
    add_run(p)
    add_ledger(p)
    p.add_argument("--entry", required=True, metavar="MODULE:FUNCTION",
                   help="the honest entry point (docs/replay.md)")  # fmt: skip
    p.add_argument(
        "--key",
        required=True,
        metavar="PEM",
        help="the verifier's own private key: signs its verdicts; the sampling secret is "
        "derived from it (keep it away from the training hosts)",
    )
    p.add_argument("--run-key-file", metavar="FILE", help="the run's fingerprint key (exact)")
    p.add_argument(
        "--ledger-key",
        metavar="PUBLIC.pem",
        help="check the run's signed heads with this key (as `ledger verify --key`); by "
        "default each stream's run key from its run-start record",
    )
    p.add_argument(
        "--expect-key-id",
        action="append",
        metavar="ID",
        help="pin rank 0's run key id as watch logged it (as `ledger verify "
        "--expect-key-id`; repeat to pin other ranks): a run rewritten whole with another "
        "key is refused; without it rank 0's key is pinned from the anchor file, as "
        "`ledger verify` does",
    )
    add_anchors(p)
    p.add_argument("--rate", type=float, default=None, help="share of segments recomputed")
    p.add_argument(
        "--assume-fraction",
        type=float,
        default=0.1,
        help="for the report: the share of segments a sabotage is active in (default 0.1)",
    )
    p.add_argument("--follow", action="store_true", help="follow the run until it ends")
    p.add_argument("--timeout", type=float, default=None, help="stop following after S seconds")
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="S",
        help="after the run ended, keep reading S seconds (default 10 polls, 5 s): records "
        "after a run-end are named (TG1514)",
    )
    p.add_argument("--checkpoints", metavar="DIR", help="where the checkpoint files are now")
    p.add_argument("--env-snapshot", metavar="FILE", help="refuse to start unless the "
                   "environment matches this sealed snapshot (with --env-key)")  # fmt: skip
    p.add_argument("--env-key", metavar="PEM", help="public key that signed the snapshot")
    p.add_argument(
        "--code",
        metavar="DIR",
        help="import the entry from this sealed folder (`trainguard seal DIR`), after "
        "verifying its seal with --code-key; refuse to start (exit 1) if it does not verify",
    )
    p.add_argument("--code-key", metavar="PEM", help="public key that sealed --code")
    p.add_argument(
        "--expect-data",
        metavar="DIGEST",
        help="the sealed dataset's digest the run must read (printed by `trainguard data "
        "seal`): other data, or an older version signed by the same key, is TG1522",
    )
    add_output(p, ("text", "json"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=_verify_run)


def _verify_run(args: argparse.Namespace) -> int:
    from trainguard.cli.replay import expect_digest, read_key
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import DEFAULT_RATE, secret_from
    from trainguard.ledger.runkey import check_expected_ids
    from trainguard.render import installed_version, render
    from trainguard.render.verifier import verdict_line

    if args.env_snapshot:
        from trainguard.env.verify import check_against

        findings = check_against(args.env_snapshot, args.env_key)
        if findings:
            for f in findings[:20]:
                print(f"trainguard verify-run: {f.rule}: {f.message}", file=sys.stderr)
            print("trainguard verify-run: the environment does not match the sealed snapshot; "
                  "not starting", file=sys.stderr)  # fmt: skip
            return EXIT_FINDINGS
    expected = args.expect_key_id
    if expected is not None and check_expected_ids(expected):
        raise UsageError("--expect-key-id: " + "; ".join(check_expected_ids(expected)))
    pins = pins_for(args, run_id(args), ledger_url(args))
    for line in (pins.note, *pins.warnings):  # also with -q: what the verdicts stand on
        print(f"trainguard verify-run: {printable(line)}", file=sys.stderr)
    if pins.refusal is not None:  # as `ledger verify` would fail it: nothing is recomputed
        print(f"trainguard verify-run: {printable(pins.refusal)}; not started", file=sys.stderr)
        return EXIT_FINDINGS
    if args.code and not _sealed_code(args.code, args.code_key):
        return EXIT_FINDINGS
    try:
        with open(args.key, "rb") as fh:
            material = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--key {args.key}: {exc.strerror or exc}") from None
    if len(material) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"--key {args.key}: larger than a key")
    verifier = Verifier(
        ledger_url(args),
        run_id(args),
        args.entry,
        signing_key=args.key,
        secret=secret_from(material),
        rate=args.rate if args.rate is not None else DEFAULT_RATE,
        fraction=args.assume_fraction,
        run_key=read_key(args.run_key_file) if args.run_key_file else None,
        checkpoint_dir=args.checkpoints,
        expect_data=expect_digest(args.expect_data),
        ledger_key=args.ledger_key,
        expect_key_ids=pins.key_ids,
    )

    def progress(verdict: object) -> None:
        if not args.quiet:
            print(f"trainguard verify-run: {verdict_line(verdict)}", file=sys.stderr, flush=True)

    try:
        if args.follow:
            summary = verifier.follow(timeout=args.timeout, on_verdict=progress, grace=args.grace)
        else:
            for verdict in verifier.poll(final=True):
                progress(verdict)
            summary = verifier.conclude()
    finally:
        verifier.close()
    write_output(render(summary, args.format, tool_version=installed_version()), args.output)
    return summary.exit_code()


def _sealed_code(folder: str, key: str | None) -> bool:
    """Verify the sealed copy of the training code, then import from it (and nothing newer:
    no bytecode is written, so a pyc the seal does not cover cannot appear)."""
    import os

    from trainguard.signing import VerificationError, verify

    if key is None:
        raise UsageError("--code needs --code-key, the public key that sealed it")
    try:
        verify(folder, key, cache=False)
    except VerificationError as exc:
        print(f"trainguard verify-run: {folder}: the sealed training code does not verify: "
              f"{exc}; not starting", file=sys.stderr)  # fmt: skip
        return False
    sys.dont_write_bytecode = True
    sys.path.insert(0, os.path.abspath(folder))
    return True
