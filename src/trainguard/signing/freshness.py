"""Is this the seal the user expects, or an older one of the same key?

A signature only says that the key holder signed this manifest once.  Anyone
who can write the model folder can put back an older folder together with
its own, perfectly valid, ``model.sig``: the key verifies it, the files match
it, and the model is a release the signer has since replaced (a rollback).
What ties a seal to a release is what the signer put *in* the signed
manifest (a subject name and a version, see :class:`~trainguard.signing.manifest.SealInfo`)
checked against what the verifier expects from elsewhere: a minimum version
from the release process, or the digest of the one manifest it trusts.

What remains: the key holder can always sign a new manifest with any name and
version, so these checks stop replays of old seals, not a stolen key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainguard.errors import UsageError
from trainguard.findings import Finding
from trainguard.rules import rule
from trainguard.signing.manifest import Manifest

# Versions are compared as dotted numbers: "7", "1.10.2", "2024.06.01", with an
# optional leading "v".  Anything else can be recorded, but a minimum cannot be
# checked against it (refused: guessing an order would let a rollback through).
_VERSION = re.compile(r"^v?(\d{1,18}(?:\.\d{1,18}){0,15})$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def version_key(text: str) -> tuple[int, ...] | None:
    """``"1.10"`` -> ``(1, 10)``; None when ``text`` is not a dotted number."""
    found = _VERSION.match(text.strip())
    if found is None:
        return None
    parts = [int(p) for p in found.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 1.0 == 1
    return tuple(parts)


@dataclass(frozen=True)
class Expectation:
    """What the verifier knows from outside the folder; every field optional.

    ``digest`` pins one manifest: the SHA-256 (hex) of the signed payload, as
    ``trainguard seal`` prints it and :attr:`SealResult.manifest_digest` gives it.
    """

    name: str | None = None
    min_version: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.min_version is not None and version_key(self.min_version) is None:
            problems.append(
                f"minimum version {self.min_version[:80]!r} is not a dotted number (1, 2.10, v3.1)"
            )
        if self.digest is not None and not _SHA256_HEX.match(self.digest.lower()):
            problems.append("the expected manifest digest must be 64 hex digits (SHA-256)")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def empty(self) -> bool:
        return self.name is None and self.min_version is None and self.digest is None


def _finding(rule_id: str, message: str, file: str, evidence: dict[str, str]) -> Finding:
    return Finding(rule_id, rule(rule_id).severity, message, file=file, evidence=evidence)


def check(expect: Expectation, manifest: Manifest, payload_digest: str, file: str) -> list[Finding]:
    """Findings for every way the verified manifest is not the expected seal."""
    findings: list[Finding] = []
    info = manifest.info
    if expect.digest is not None and expect.digest.lower() != payload_digest:
        findings.append(
            _finding(
                "TG508",
                "not the pinned seal: the signed manifest's digest differs (an older or "
                "another seal of the same key put in its place?)",
                file,
                {
                    "expected_manifest_digest": expect.digest.lower(),
                    "manifest_digest": payload_digest,
                },
            )
        )
    if expect.name is not None:
        # model-signing names the subject after the folder; trainguard's own name wins.
        sealed_name = info.name if info.name is not None else manifest.model_name
        if sealed_name != expect.name:
            findings.append(
                _finding(
                    "TG509",
                    f"sealed for {sealed_name[:80]!r}, not the expected {expect.name[:80]!r}",
                    file,
                    {"sealed_name": sealed_name[:256], "expected_name": expect.name[:256]},
                )
            )
    if expect.min_version is not None:
        findings += _version(expect.min_version, info.version, info.sealed_at, file)
    return findings


def file_name(manifest: Manifest, name: str, file: str) -> list[Finding]:
    """A single file's seal is bound to the file's name (its subject, as
    model-signing writes it): bytes and signature copied under another name are
    not the file sealed under this name (TG506)."""
    if manifest.model_name == name:
        return []
    message = (
        f"the seal is for a file named {manifest.model_name[:80]!r}, not {name[:80]!r}: "
        "bytes and signature of another file put under this name"
    )
    evidence = {"sealed_as": manifest.model_name[:256], "now_at": name[:256]}
    return [_finding("TG506", message, file, evidence)]


def _version(minimum: str, sealed: str | None, sealed_at: str | None, file: str) -> list[Finding]:
    evidence = {"minimum_version": minimum}
    if sealed_at is not None:
        evidence["sealed_at"] = sealed_at
    if sealed is None:
        message = (
            "the seal carries no version, so it cannot be shown to be at least "
            f"{minimum!r} (sealed before versions were recorded, or by another tool)"
        )
        return [_finding("TG508", message, file, evidence)]
    evidence["sealed_version"] = sealed
    have, want = version_key(sealed), version_key(minimum)
    if have is None:
        message = f"the sealed version {sealed[:80]!r} is not a dotted number: cannot compare"
        return [_finding("TG508", message, file, evidence)]
    if want is not None and have < want:
        message = (
            f"rollback: the seal is for version {sealed!r}, older than the minimum {minimum!r} "
            "(an older release with its own valid signature)"
        )
        return [_finding("TG508", message, file, evidence)]
    return []
