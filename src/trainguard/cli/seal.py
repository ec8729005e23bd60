"""``trainguard seal``, ``verify`` and ``keygen``: the command line of the seal pillar.

A thin layer over :mod:`trainguard.seal`: parse, call, render, return the exit
code (0 verified, 1 findings, 2 could not check).  Status lines and the
progress bar go to stderr; the verification report goes to stdout or
``--output``.  Key material is never printed: only key ids (SHA-256 of the
public key) and file names.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainguard.errors import UsageError
from trainguard.findings import Severity

if TYPE_CHECKING:
    from trainguard.signing.keys import PrivateKey

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
PASSWORD_ENV = "TRAINGUARD_KEY_PASSWORD"  # noqa: S105 - the variable's name, not a secret
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1000000``, ``64M``, ``1GiB``: suffixes are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1000000, 512M, 1G)")
    suffix = (match.group(2) or " ").lower()[0]
    value: int = int(match.group(1)) * 1024 ** " kmgt".index(suffix)
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def register(sub: Any) -> None:
    s = sub.add_parser(
        "seal",
        help="sign a manifest of a model folder or file",
        description="Hash every file of PATH and sign the manifest with a private key. The "
        "signature is a Sigstore bundle in the OpenSSF model-signing v1 format "
        "(`model_signing verify key` accepts it when --hash is sha256).",
    )
    s.add_argument("path", metavar="PATH", help="model folder or single file")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--key",
        metavar="PRIVATE.pem",
        help=f"PEM private key (ECDSA P-256/P-384 or Ed25519); an encrypted key "
        f"reads its password from ${PASSWORD_ENV} or asks for it",
    )
    who.add_argument(
        "--keyless",
        action="store_true",
        help="sign with a short-lived Sigstore certificate for your OIDC identity "
        "(needs trainguard[keyless] and the network; token from --identity-token, "
        "$SIGSTORE_ID_TOKEN or a CI's ambient credentials)",
    )
    s.add_argument(
        "--identity-token",
        metavar="TOKEN",
        help="OIDC token for --keyless (other users can read a command line: prefer "
        "$SIGSTORE_ID_TOKEN)",
    )
    s.add_argument(
        "--signature",
        metavar="OUT",
        help="where to write the signature (default: PATH/model.sig for a folder, "
        "FILE.sig beside a file)",
    )
    s.add_argument(
        "--hash",
        choices=("sha256", "blake3"),
        default="sha256",
        help="digest algorithm (default sha256; model-signing's command line only "
        "verifies sha256, its API both)",
    )
    s.add_argument(
        "--shard-size",
        type=parse_size,
        metavar="BYTES",
        help="hash files in shards of this size (model-signing's 'shards' "
        "serialization; sha256 only), so a change is located to a shard",
    )
    _common(s)
    s.set_defaults(handler=_seal)

    v = sub.add_parser(
        "verify",
        help="verify a model folder or file against its signature",
        description="Check the signature with a public key, then report every modified, "
        "added, removed and renamed file, and every link or special file, as findings. "
        "Accepts signatures made by trainguard seal and by OpenSSF model-signing.",
    )
    v.add_argument("path", metavar="PATH", help="model folder or single file")
    v.add_argument(
        "--key",
        metavar="PUBLIC.pem",
        help="PEM public key, or a certificate holding it",
    )
    v.add_argument(
        "--identity",
        metavar="ID",
        help="keyless: the signer's identity in its Sigstore certificate (an email, "
        "or a CI workflow URI); needs --issuer and trainguard[keyless]",
    )
    v.add_argument(
        "--issuer", metavar="URL", help="keyless: the OIDC issuer that vouched for --identity"
    )
    v.add_argument(
        "--offline",
        action="store_true",
        help="keyless: use the Sigstore trusted root shipped with sigstore; fetch nothing",
    )
    v.add_argument(
        "--signature", metavar="SIG", help="the signature (default: PATH/model.sig, or FILE.sig)"
    )
    v.add_argument("-f", "--format", choices=("text", "json", "sarif"), default="text")
    v.add_argument("-o", "--output", metavar="FILE", help="write the report here, not stdout")
    v.add_argument("--strict", action="store_true", help="fail on low findings too")
    _common(v)
    v.set_defaults(handler=_verify)

    k = sub.add_parser(
        "keygen",
        help="create a signing key pair",
        description="Write PREFIX.pem (private, mode 0600) and PREFIX.pub. "
        "Nothing is overwritten and no key is printed.",
    )
    k.add_argument("-o", "--output", required=True, metavar="PREFIX")
    k.add_argument(
        "--type",
        dest="key_type",
        default="ecdsa-p256",
        choices=("ecdsa-p256", "ecdsa-p384", "ed25519"),
        help="default ecdsa-p256; model-signing accepts the ECDSA keys only",
    )
    k.set_defaults(handler=_keygen)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out a path relative to PATH, or a glob such as '*.tmp' "
        "(repeatable; .git and the signature are always left out)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="hash every file afresh instead of reusing cached digests of unchanged files",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--workers", type=int, metavar="N", help="hashing threads (default: cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _private_key(path: str) -> PrivateKey:
    from trainguard.signing.errors import KeyLoadError
    from trainguard.signing.keys import load_private_key

    try:
        return load_private_key(path)
    except KeyLoadError as exc:
        if "password is needed" not in str(exc):
            raise
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise KeyLoadError(f"{path}: the key is encrypted; set ${PASSWORD_ENV}")
        password = getpass.getpass(f"password for {path}: ")
    return load_private_key(path, password.encode("utf-8"))


@contextmanager
def _progress_bar(enabled: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _cache_arg(args: argparse.Namespace) -> bool:
    return not args.no_cache


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"


def _seal(args: argparse.Namespace) -> int:
    from trainguard.signing import seal
    from trainguard.signing.keys import key_id

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.keyless:
        from trainguard.signing import KeylessSigning

        key: Any = KeylessSigning(identity_token=args.identity_token)
        signer = "keyless Sigstore"
    else:
        if args.identity_token:
            raise UsageError("--identity-token is for --keyless")
        key = _private_key(args.key)
        signer = f"key id {key_id(key.public_key())[:16]}"
    with _progress_bar(_show_progress(args), "hashing") as progress:
        result = seal(
            args.path,
            key,
            signature=args.signature,
            hash=args.hash,
            shard_size=args.shard_size,
            ignore=args.ignore,
            cache=_cache_arg(args),
            full=args.full,
            workers=args.workers,
            progress=progress,
        )
    for note in result.notes:
        print(f"trainguard: warning: {note}", file=sys.stderr)
    files = len({r.path for r in result.manifest.resources})
    size = sum(r.size or 0 for r in result.manifest.resources)
    if result.manifest.serialization.method == "shards":
        size = sum(r.span[1] - r.span[0] for r in result.manifest.resources if r.span)
    print(
        f"sealed {files} file{'' if files == 1 else 's'} ({_human(size)}, "
        f"{result.manifest.serialization.algorithm}; {result.stats.files_from_cache} from the "
        f"digest cache) -> {result.signature} ({signer})",
        file=sys.stderr,
    )
    return EXIT_OK


def _verifying_key(args: argparse.Namespace) -> Any:
    keyless = args.identity is not None or args.issuer is not None
    if keyless == (args.key is not None):
        raise UsageError(
            "give --key PUBLIC.pem, or --identity and --issuer for a keyless signature"
        )
    if not keyless:
        if args.offline:
            raise UsageError("--offline is for keyless verification (--identity, --issuer)")
        return args.key
    if args.identity is None or args.issuer is None:
        raise UsageError("keyless verification needs both --identity and --issuer")
    from trainguard.signing import SigstoreIdentity

    return SigstoreIdentity(args.identity, args.issuer, offline=args.offline)


def _verify(args: argparse.Namespace) -> int:
    from trainguard.render import render
    from trainguard.signing import verify_report

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    fail_on = Severity.LOW if args.strict else Severity.HIGH
    with _progress_bar(_show_progress(args), "verifying") as progress:
        result = verify_report(
            args.path,
            _verifying_key(args),
            signature=args.signature,
            ignore=args.ignore,
            cache=_cache_arg(args),
            full=args.full,
            workers=args.workers,
            progress=progress,
            fail_on=fail_on,
        )
    for note in result.notes:
        print(f"trainguard: warning: {note}", file=sys.stderr)
    color = (
        args.output is None
        and args.format == "text"
        and sys.stdout.isatty()
        and "NO_COLOR" not in os.environ
    )
    text = render(result.report, args.format, color=color)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    code = result.report.exit_code()
    if code == EXIT_OK:
        print(
            f"verified {result.files_checked} file{'' if result.files_checked == 1 else 's'} "
            f"against {result.signature} ("
            f"{result.signer_identity or 'key id ' + result.signer_key_id[:16]}; "
            f"{result.stats.files_from_cache} from the digest cache)",
            file=sys.stderr,
        )
    return code


def _keygen(args: argparse.Namespace) -> int:
    from trainguard.signing.keys import write_keypair

    private, public = write_keypair(args.output, args.key_type)
    print(f"wrote {private} (private, mode 0600) and {public} ({args.key_type})", file=sys.stderr)
    return EXIT_OK
