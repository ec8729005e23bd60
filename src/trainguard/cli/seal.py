"""``trainguard seal``, ``verify`` and ``keygen``: the command line of the seal pillar.

A thin layer over :mod:`trainguard.seal`: parse, call, render, return the exit
code (0 verified, 1 findings, 2 could not check).  Status lines and the
progress bar go to stderr; the verification report goes to stdout or
``--output``.  Key material is never printed: only key ids (SHA-256 of the
public key) and file names.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainguard.cli._common import (
    EXIT_OK,
    PASSWORD_ENV,
    Subparsers,
    add_output,
    add_verdict,
    byte_progress,
    fail_on,
    human_size,
    no_progress_arg,
    parse_size,
    private_key,
    show_progress,
    use_color,
    warn,
    workers,
    write_output,
)
from trainguard.errors import UsageError

__all__ = ["PASSWORD_ENV", "parse_size", "register"]


def register(sub: Subparsers) -> None:
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
    s.add_argument(
        "--name",
        metavar="NAME",
        help="the model's name, signed into the manifest (verify --expect-name checks it)",
    )
    s.add_argument(
        "--version",
        dest="seal_version",
        metavar="VERSION",
        help="the release's version or counter, a dotted number such as 7 or 1.4.2, signed "
        "into the manifest (verify --min-version refuses older seals: rollbacks)",
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
    v.add_argument(
        "--expect-name",
        metavar="NAME",
        help="the seal must name this model (seal --name; else the folder name "
        "model-signing records); another is TG509",
    )
    v.add_argument(
        "--min-version",
        metavar="VERSION",
        help="the seal must carry at least this version (seal --version): an older seal of "
        "the same key, or one without a version, is a rollback (TG508)",
    )
    v.add_argument(
        "--expect-digest",
        metavar="SHA256",
        help="pin the one seal you trust: the SHA-256 of its signed manifest, as seal "
        "prints it; any other seal of the same key is TG508",
    )
    add_output(v, ("text", "json", "sarif"))
    add_verdict(v)
    _common(v)
    v.set_defaults(handler=_verify)

    k = sub.add_parser(
        "keygen",
        help="create a signing key pair",
        description="Write PREFIX.pem (private, mode 0600) and PREFIX.pub. "
        "Nothing is overwritten and no key is printed.",
    )
    k.add_argument(
        "-o", "--output", required=True, metavar="PREFIX", help="write PREFIX.pem and PREFIX.pub"
    )
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
    no_progress_arg(p)


def _seal(args: argparse.Namespace) -> int:
    from trainguard.signing import seal
    from trainguard.signing.keys import key_id

    if args.keyless:
        from trainguard.signing import KeylessSigning

        key: Any = KeylessSigning(identity_token=args.identity_token)
        signer = "keyless Sigstore"
    else:
        if args.identity_token:
            raise UsageError("--identity-token is for --keyless")
        key = private_key(args.key)
        signer = f"key id {key_id(key.public_key())[:16]}"
    with byte_progress(show_progress(args), "hashing") as progress:
        result = seal(
            args.path,
            key,
            signature=args.signature,
            hash=args.hash,
            shard_size=args.shard_size,
            ignore=args.ignore,
            cache=not args.no_cache,
            full=args.full,
            workers=workers(args),
            progress=progress,
            name=args.name,
            version=args.seal_version,
        )
    for note in result.notes:
        warn(note)
    if result.hash_mode:
        print(f"hashing: {result.hash_mode}", file=sys.stderr)
    files = len({r.path for r in result.manifest.resources})
    size = sum(r.size or 0 for r in result.manifest.resources)
    if result.manifest.serialization.method == "shards":
        size = sum(r.span[1] - r.span[0] for r in result.manifest.resources if r.span)
    print(
        f"sealed {files} file{'' if files == 1 else 's'} ({human_size(size)}, "
        f"{result.manifest.serialization.algorithm}; {result.stats.files_from_cache} from the "
        f"digest cache) -> {result.signature} ({signer})",
        file=sys.stderr,
    )
    release = " ".join(
        f"{what} {value!r}"
        for what, value in (("name", args.name), ("version", args.seal_version))
        if value is not None
    )
    print(
        f"manifest sha256 {result.manifest_digest}{'; ' + release if release else ''} "
        "(pin it with verify --expect-digest)",
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

    failing = fail_on(args)
    with byte_progress(show_progress(args), "verifying") as progress:
        result = verify_report(
            args.path,
            _verifying_key(args),
            signature=args.signature,
            ignore=args.ignore,
            cache=not args.no_cache,
            full=args.full,
            workers=workers(args),
            progress=progress,
            fail_on=failing,
            expect_name=args.expect_name,
            min_version=args.min_version,
            expect_digest=args.expect_digest,
        )
    for note in result.notes:
        warn(note)
    write_output(render(result.report, args.format, color=use_color(args)), args.output)
    code = result.report.exit_code()
    if result.hash_mode:
        print(f"hashing: {result.hash_mode}", file=sys.stderr)
    if code == EXIT_OK:
        info = result.manifest.info if result.manifest is not None else None
        release = ""
        if info is not None and (info.name or info.version):
            release = f"; seal of {info.name or '?'!r} version {info.version or '?'!r}"
        print(
            f"verified {result.files_checked} file{'' if result.files_checked == 1 else 's'} "
            f"against {result.signature} ("
            f"{result.signer_identity or 'key id ' + result.signer_key_id[:16]}{release}; "
            f"manifest sha256 {result.manifest_digest[:16]}...)",
            file=sys.stderr,
        )
    return code


def _keygen(args: argparse.Namespace) -> int:
    from trainguard.signing.keys import write_keypair

    private, public = write_keypair(args.output, args.key_type)
    print(f"wrote {private} (private, mode 0600) and {public} ({args.key_type})", file=sys.stderr)
    return EXIT_OK
