"""Signed environment snapshots: ``env snapshot`` and ``env verify --against``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.test_env_support import (
    FLIPPED_SOURCE,
    NAME,
    fresh_site,
    rewrite_record_line,
    write_swapped_pyc,
)
from trainguard.cli.main import main
from trainguard.env.snapshot import decode, encode, make_snapshot
from trainguard.signing.keys import generate_keypair


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = generate_keypair("ecdsa-p256")
    (tmp_path / "key.pem").write_bytes(private)
    (tmp_path / "key.pub").write_bytes(public)
    return tmp_path / "key.pem", tmp_path / "key.pub"


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    return fresh_site(tmp_path)


def snapshot(site: Path, private: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "env",
            "snapshot",
            "--path",
            str(site),
            "--key",
            str(private),
            "-o",
            str(out),
            "--no-cache",
            "--no-progress",
            *extra,
        ]
    )


def verify_against(
    site: Path, snap: Path, public: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, dict[str, list[str]]]:
    code = main(
        [
            "env",
            "verify",
            "--path",
            str(site),
            "--against",
            str(snap),
            "--key",
            str(public),
            "-f",
            "json",
            "--no-cache",
            "--no-progress",
            *extra,
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    rules: dict[str, list[str]] = {}
    for result in doc["files"]:
        for f in result["findings"]:
            rules.setdefault(f["rule"], []).append(f["file"])
    return code, rules


def test_snapshot_round_trip(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    envelope = json.loads(snap.read_text())
    assert envelope["payloadType"] == "application/vnd.trainguard.env-snapshot+json"
    payload = decode(base64.b64decode(envelope["payload"]))
    assert str(site / NAME / "optim.py") in payload.files
    assert payload.interpreter["version"] and payload.platform["machine"]
    assert payload.roots == [str(site)]
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 0
    assert set(rules) == {"TG606"}


def test_edit_that_also_rewrote_record_is_caught_only_with_the_snapshot(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    optim = site / NAME / "optim.py"
    # A longer file: the old pyc's header no longer matches, so Python
    # recompiles (a same-size edit in the same second would leave the stale
    # pyc loaded, which the pyc check reports on its own).
    optim.write_text(FLIPPED_SOURCE + "# tuned\n")
    rewrite_record_line(site, f"{NAME}/optim.py")
    # Plain verify: RECORD agrees with the edit, and the stale pyc is not loaded.
    plain = main(
        ["env", "verify", "--path", str(site), "--no-cache", "--no-progress", "-f", "json"]
    )
    assert plain == 0
    assert "TG601" not in capsys.readouterr().out
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 1
    assert str(optim) in rules["TG615"]
    assert any(p.endswith("RECORD") for p in rules["TG615"])


def test_added_and_removed_files(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    (site / NAME / "data.txt").unlink()
    (site / NAME / "extra.py").write_text("X = 1\n")
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 1
    assert rules["TG617"] == [str(site / NAME / "data.txt")]
    assert rules["TG616"] == [str(site / NAME / "extra.py")]


def test_recompiled_pyc_is_not_a_snapshot_difference(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    # The interpreter rewrites caches (here: one for the right code, in a new
    # file); the pyc check judges them, not their digest.
    source = (site / NAME / "optim.py").read_text()
    write_swapped_pyc(site / NAME / "optim.py", source)
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 0, rules
    write_swapped_pyc(site / NAME / "optim.py", FLIPPED_SOURCE)
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 1
    assert "TG610" in rules and "TG615" not in rules


def test_snapshot_signed_by_another_key_fails(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    _, other = generate_keypair("ed25519")
    (tmp_path / "other.pub").write_bytes(other)
    code, rules = verify_against(site, snap, tmp_path / "other.pub", capsys)
    assert code == 1
    assert rules["TG501"] == [str(snap)]


def test_snapshot_edited_after_signing_fails(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    envelope = json.loads(snap.read_text())
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["files"] = [row for row in payload["files"] if not row[0].endswith("optim.py")]
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    snap.write_text(json.dumps(envelope))
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 1
    assert "TG501" in rules


def test_truncated_snapshot_is_malformed(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    snap.write_bytes(snap.read_bytes()[:100])
    code, rules = verify_against(site, snap, keys[1], capsys)
    assert code == 1
    assert "TG502" in rules


def test_snapshot_refuses_a_failing_environment(
    tmp_path: Path, site: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (site / "evil.pth").write_text("import os\n")
    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 1
    assert not snap.exists()
    assert "TG605" in capsys.readouterr().out
    assert snapshot(site, keys[0], snap, "--force") == 0
    assert snap.exists()


def test_usage_errors(tmp_path: Path, site: Path, keys: tuple[Path, Path]) -> None:
    assert main(["env", "verify", "--path", str(site), "--against", "x.json"]) == 2
    assert main(["env", "verify", "--path", str(site), "--key", str(keys[1])]) == 2
    assert main(["env", "verify", "--path", str(tmp_path / "nope")]) == 2
    assert (
        main(
            [
                "env",
                "snapshot",
                "--path",
                str(site),
                "--key",
                str(keys[1]),
                "-o",
                str(tmp_path / "s.json"),
            ]
        )
        == 2
    )  # a public key cannot sign


def test_encode_decode_is_exact() -> None:
    snap = make_snapshot(["/r"], {"/r/a": ("0" * 64, 3), "/r/\udcff": ("1" * 64, 0)})
    again = decode(encode(snap))
    assert again.files == snap.files
    assert again.interpreter == snap.interpreter
    with pytest.raises(ValueError, match="bad file entry"):
        decode(encode(snap).replace(b'"' + b"0" * 64 + b'"', b'"xyz"'))


def test_check_against_is_one_check_for_protect_and_watch(
    tmp_path: Path, site: Path, keys: tuple[Path, Path]
) -> None:
    """``check_against`` (what protect(env_snapshot=) and watch(env_snapshot=) call): the
    key as a path or as an object gives the same answer; no key is a usage error."""
    from trainguard.env.verify import check_against
    from trainguard.errors import UsageError
    from trainguard.signing.keys import load_public_key

    snap = tmp_path / "env.snapshot.json"
    assert snapshot(site, keys[0], snap) == 0
    assert check_against(snap, keys[1], [str(site)]) == []
    optim = site / NAME / "optim.py"
    optim.write_text(FLIPPED_SOURCE + "# tuned\n")
    rewrite_record_line(site, f"{NAME}/optim.py")
    by_path = check_against(snap, str(keys[1]), [str(site)])
    by_object = check_against(snap, load_public_key(keys[1]), [str(site)])
    assert [(f.rule, f.file) for f in by_path] == [(f.rule, f.file) for f in by_object]
    assert ("TG615", str(optim)) in [(f.rule, f.file) for f in by_path]
    with pytest.raises(UsageError, match="env_key"):
        check_against(snap, None, [str(site)])
