"""Generative: no bundle, certificate, key or file name makes seal or verify crash.

Each run draws a fresh seed (printed on failure; set ``TRAINGUARD_FUZZ_SEED``
to replay one).  Folders get random byte-string names (``os.fsencode`` paths,
most of them invalid UTF-8); a real bundle is corrupted at random (fields
dropped or retyped, oversized strings, base64 garbage, truncation, flipped
bytes, a statement re-signed with broken fields, certificates holding DSA,
Ed448, RSA, X25519 or unknown-OID keys).  The invariant: ``verify_report``
raises nothing but its documented errors, the CLI exits 0, 1 or 2 with no
"internal error", and a corruption of signed bytes never verifies.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x25519
from cryptography.x509.oid import NameOID

from trainguard.cli.main import main
from trainguard.errors import UsageError
from trainguard.signing import SealError, seal, verify_report
from trainguard.signing.dsse import IN_TOTO_PAYLOAD_TYPE, sign_envelope
from trainguard.signing.keys import load_private_key, write_keypair

SEED = int(os.environ.get("TRAINGUARD_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
SCALE = int(os.environ.get("TRAINGUARD_FUZZ_SCALE") or 1)  # bench/fuzz_long.sh raises it
CASES = 60 * SCALE
WEAK = 1024  # DSA/RSA key size: these keys never sign anything, and 2048 is slow to make
DOCUMENTED = (SealError, UsageError)  # "could not check": exit 2 with a message


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def random_name(rng: random.Random) -> bytes:
    """A file name as the kernel allows it: any bytes but NUL and '/'."""
    if rng.random() < 0.2:
        return rng.choice([b"w.bin", b"config.json", b"caf\xc3\xa9", b"-x", b" lead"])
    alphabet = [b for b in range(1, 256) if b != ord("/")]
    name = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
    return name if name not in (b".", b"..") else b"x" + name


def make_folder(root: Path, rng: random.Random, files: int = 4) -> list[bytes]:
    broot = os.fsencode(root)
    os.makedirs(broot)
    names: list[bytes] = []
    while len(names) < files:
        name = random_name(rng)
        if name in names or name == b"model.sig":
            continue
        path = os.path.join(broot, name)
        if rng.random() < 0.3:  # one level down, in a byte-named folder
            os.makedirs(os.path.join(broot, b"d\xff"), exist_ok=True)
            path = os.path.join(broot, b"d\xff", name)
        with open(path, "wb") as fh:
            fh.write(rng.randbytes(rng.randint(0, 3000)))
        names.append(path)
    return names


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_seal_and_verify_folders_with_byte_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    private, public = write_keypair(tmp_path / "key")
    for i in range(4 * SCALE):
        root = tmp_path / f"m{i}"
        paths = make_folder(root, rng)
        code, text = cli(capsys, "seal", str(root), "--key", str(private), "--no-progress")
        assert code == 0, f"seed {SEED}: {text}"
        code, text = cli(capsys, "verify", str(root), "--key", str(public), "-f", "json")
        assert code == 0, f"seed {SEED}: {text}"
        assert json.loads(text[: text.rindex("}") + 1])["files"]
        # Tampering with a byte-named file is a finding naming it, not a crash.
        victim = rng.choice(paths)
        with open(victim, "ab") as fh:
            fh.write(b"!")
        extra = os.path.join(os.fsencode(root), random_name(rng) + b".new")
        with open(extra, "wb") as fh:
            fh.write(b"planted")
        for fmt in ("text", "json", "sarif"):
            code, text = cli(capsys, "verify", str(root), "--key", str(public), "-f", fmt)
            assert code == 1 and "internal error" not in text, f"seed {SEED} {fmt}: {text}"
        report = verify_report(root, public).report
        rules = sorted(f.rule for f in report.findings)
        assert rules == ["TG503", "TG504"], f"seed {SEED}: {rules}"


def test_a_path_that_is_a_link_or_a_fifo_is_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = write_keypair(tmp_path / "key")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")
    seal(tmp_path / "real", private, signature=tmp_path / "s")  # verify reads it first
    for name in ("link", "fifo"):
        for verb, key in (("seal", private), ("verify", public)):
            argv = [
                verb,
                str(tmp_path / name),
                "--key",
                str(key),
                "--signature",
                str(tmp_path / "s"),
            ]
            code, text = cli(capsys, *argv)
            assert code == 2 and "internal error" not in text and "not a file or folder" in text


# -- corrupted bundles ----------------------------------------------------------


def _cert_der(public_key: Any, signer: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def odd_certificates() -> dict[str, bytes]:
    """DER certificates whose keys trainguard cannot verify with, and broken ones."""
    ca = ec.generate_private_key(ec.SECP256R1())
    p256 = _cert_der(ec.generate_private_key(ec.SECP256R1()).public_key(), ca)
    return {
        "dsa": _cert_der(dsa.generate_private_key(WEAK).public_key(), ca),
        "ed448": _cert_der(ed448.Ed448PrivateKey.generate().public_key(), ca),
        "rsa": _cert_der(rsa.generate_private_key(65537, WEAK).public_key(), ca),
        "x25519": _cert_der(x25519.X25519PrivateKey.generate().public_key(), ca),
        "secp256k1": _cert_der(ec.generate_private_key(ec.SECP256K1()).public_key(), ca),
        # id-ecPublicKey (1.2.840.10045.2.1) turned into an OID nobody knows.
        "unknown-oid": p256.replace(
            bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209")
        ),
        "unknown-curve": p256.replace(
            bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06082a8648ce3d030199")
        ),
        "truncated": p256[: len(p256) // 2],
    }


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, drop: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _odd_value(rng: random.Random) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([0, -1, 1 << 70, 1e308, 1.5, True]),
        lambda: "",
        lambda: "A" * rng.choice([10, 70_000, 300_000]),
        lambda: rng.choice(["!!!!", "====", "\udcff\ud800", "../../etc/passwd", "a\x00b", "."]),
        lambda: base64.b64encode(rng.randbytes(rng.randint(0, 200))).decode(),
        lambda: [],
        lambda: {},
        lambda: [rng.randint(0, 9) for _ in range(5)],
        lambda: {"rawBytes": "@@"},
    ]
    return rng.choice(choices)()


def _signed_part(doc: Any) -> Any:
    """What the DSSE signature covers: the payload and its type (keyid is a hint)."""
    env = doc.get("dsseEnvelope") if isinstance(doc, dict) else None
    return (env.get("payload"), env.get("payloadType")) if isinstance(env, dict) else None


def _mutate_json(rng: random.Random, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc)[1:])
    if rng.random() < 0.4:
        return _set(doc, path, None, drop=True)
    return _set(doc, path, _odd_value(rng))


def test_corrupted_bundles_never_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], odd_certificates: dict[str, bytes]
) -> None:
    rng = random.Random(SEED ^ 0x5EA1)
    private, public = write_keypair(tmp_path / "key")
    signer = load_private_key(private)
    root = tmp_path / "model"
    make_folder(root, rng)
    sig = seal(root, private, shard_size=1024 if rng.random() < 0.5 else None).signature
    good = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(good["dsseEnvelope"]["payload"]))
    for case in range(CASES):
        kind = rng.choice(["json", "json", "statement", "certificate", "bytes"])
        signed_bytes_changed = False
        if kind == "json":
            doc = _mutate_json(rng, good)
            signed_bytes_changed = _signed_part(doc) != _signed_part(good)
            data = json.dumps(doc).encode()
        elif kind == "statement":  # well signed, broken inside: exercises the parser
            body = json.dumps(_mutate_json(rng, statement)).encode()
            doc = copy.deepcopy(good)
            doc["dsseEnvelope"] = sign_envelope(body, IN_TOTO_PAYLOAD_TYPE, signer)
            data = json.dumps(doc).encode()
        elif kind == "certificate":
            name = rng.choice(sorted(odd_certificates))
            doc = copy.deepcopy(good)
            raw = base64.b64encode(odd_certificates[name]).decode()
            doc["verificationMaterial"] = {
                "x509CertificateChain": {"certificates": [{"rawBytes": raw}]}
            }
            data = json.dumps(doc).encode()
            signed_bytes_changed = name != "secp256k1"  # the others cannot even be read
        else:
            raw_bytes = bytearray(json.dumps(good).encode())
            cut = rng.randint(0, len(raw_bytes))
            if rng.random() < 0.5:
                raw_bytes = raw_bytes[:cut]
            else:
                for _ in range(rng.randint(1, 8)):
                    raw_bytes[rng.randrange(len(raw_bytes))] = rng.randrange(256)
            data = bytes(raw_bytes)
        bad = tmp_path / f"bad-{case}.sig"
        bad.write_bytes(data)
        where = f"seed {SEED} case {case} ({kind})"
        try:
            report = verify_report(root, public, signature=bad).report
        except DOCUMENTED:
            report = None
        except Exception as exc:  # the property under test
            pytest.fail(f"{where}: verify_report raised {type(exc).__name__}: {exc}")
        if report is not None and signed_bytes_changed:
            assert report.failed, f"{where}: a corrupted signature verified"
        code, text = cli(capsys, "verify", str(root), "--key", str(public), "--signature", str(bad))
        assert code in (0, 1, 2) and "internal error" not in text, f"{where}: {text}"
        assert (code == 0) == (report is not None and not report.failed), f"{where}: {text}"


# -- key files ------------------------------------------------------------------


def _pem_private(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_odd_key_files_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], odd_certificates: dict[str, bytes]
) -> None:
    rng = random.Random(SEED ^ 0xC0DE)
    private, _ = write_keypair(tmp_path / "key")
    root = tmp_path / "model"
    make_folder(root, rng, files=2)
    seal(root, private)
    dsa_key = dsa.generate_private_key(WEAK)
    ed448_key = ed448.Ed448PrivateKey.generate()
    candidates = {
        "dsa-private": _pem_private(dsa_key),
        "ed448-private": _pem_private(ed448_key),
        "dsa-public": dsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "empty": b"",
        "random": rng.randbytes(rng.randint(1, 4000)),
        "huge": b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 200_000,
    }
    for name, der in odd_certificates.items():
        pem = base64.encodebytes(der)
        candidates[f"cert-{name}"] = (
            b"-----BEGIN CERTIFICATE-----\n" + pem + b"-----END CERTIFICATE-----\n"
        )
    for name, data in candidates.items():
        key = tmp_path / f"{name}.pem"
        key.write_bytes(data)
        for verb in ("seal", "verify"):
            code, text = cli(capsys, verb, str(root), "--key", str(key), "--no-progress")
            assert code in (1, 2) and "internal error" not in text, (
                f"seed {SEED} {name} {verb}: {text}"
            )
            assert "trainguard" in text, f"{name} {verb}: no message"
    # A key path that is not valid UTF-8.
    odd = os.path.join(os.fsencode(tmp_path), b"k\xff.pem")
    with open(odd, "wb") as fh:
        fh.write(b"not a key")
    code, text = cli(capsys, "verify", str(root), "--key", os.fsdecode(odd))
    assert code == 2 and "internal error" not in text


def test_corrupted_keyless_bundles_never_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same corruptions of a real keyless (Fulcio/Rekor) bundle, verified offline."""
    pytest.importorskip("sigstore")
    from trainguard.signing import SigstoreIdentity

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    fixture = Path(__file__).parent / "data" / "sigstore-keyless-model" / "model"
    good = json.loads((fixture / "model.sig").read_text())
    who = SigstoreIdentity(
        "stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2", offline=True
    )
    rng = random.Random(SEED ^ 0x51657)
    for case in range(12 * SCALE):
        doc = _mutate_json(rng, good)
        bad = tmp_path / f"keyless-{case}.sig"
        bad.write_text(json.dumps(doc))
        where = f"seed {SEED} keyless case {case}"
        try:
            report = verify_report(fixture, who, signature=bad, cache=False).report
        except DOCUMENTED:
            continue
        except Exception as exc:  # the property under test
            pytest.fail(f"{where}: verify_report raised {type(exc).__name__}: {exc}")
        if _signed_part(doc) != _signed_part(good):
            assert report.failed, f"{where}: a corrupted signature verified"


def test_a_folder_with_too_many_entries_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.signing import tree

    private, public = write_keypair(tmp_path / "key")
    root = tmp_path / "model"
    make_folder(root, random.Random(SEED), files=3)
    seal(root, private)
    monkeypatch.setattr(tree, "MAX_ENTRIES", 3)
    (root / "more").write_bytes(b"x")
    for verb, key in (("seal", private), ("verify", public)):
        code, text = cli(capsys, verb, str(root), "--key", str(key), "--no-progress")
        assert code == 2 and "more than 3 entries" in text, text
