"""The registry of rule ids.  Ids are stable: users suppress them by name.

``docs/rules.md`` is generated from this table (``python -m trainguard rules
--markdown``) and a test keeps the two in step.
"""

from __future__ import annotations

from trainguard.findings import Rule, Severity

_C, _H, _M, _L, _I = (
    Severity.CRITICAL,
    Severity.HIGH,
    Severity.MEDIUM,
    Severity.LOW,
    Severity.INFO,
)

RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        # -- files ----------------------------------------------------------
        Rule(
            "TG001",
            "unknown-format",
            _I,
            "The file's content matches no format trainguard understands. It was "
            "not analysed; if a loader reads it as a model, check what it really is.",
        ),
        Rule(
            "TG002",
            "scan-limit",
            _H,
            "A safety limit (size, depth, count or time) stopped the analysis before "
            "the end of the data. What follows the limit was not checked, so the "
            "file cannot be called safe; raise the limit only for a file you trust.",
        ),
        Rule(
            "TG003",
            "unreadable",
            _H,
            "The data could not be read or parsed as the format it claims to be. A "
            "lenient loader may still execute part of it; treat it as unsafe.",
        ),
        # -- pickle ---------------------------------------------------------
        Rule(
            "TG101",
            "pickle-dangerous-global",
            _C,
            "The pickle imports a callable that can run code, touch files, start "
            "processes, reach the network or import modules. Loading it with "
            "pickle/torch.load(weights_only=False) runs the attacker's code. Do not "
            "load it; use `trainguard.load` or ask the publisher for safetensors.",
        ),
        Rule(
            "TG102",
            "pickle-stdlib-gadget",
            _H,
            "The pickle imports a standard-library function or class that is not on "
            "the allowlist. Attackers use obscure stdlib helpers (uuid, imaplib, "
            "logging, ...) to run commands while evading denylists.",
        ),
        Rule(
            "TG103",
            "pickle-imports-code",
            _M,
            "Loading this file imports and instantiates the named class or function. "
            "Common for whole nn.Module pickles, scikit-learn estimators or training "
            "arguments; trust it only if you trust the file's author, or allow the "
            "global in a policy.",
        ),
        Rule(
            "TG104",
            "pickle-dynamic-call",
            _C,
            "The pickle calls something it computed at load time (a call's result, or "
            "a module/name built on the stack) rather than a plain import. Benign "
            "checkpoints never do this; it is how payloads hide from scanners.",
        ),
        Rule(
            "TG105",
            "pickle-tamper-on-load",
            _C,
            "The pickle mutates objects while it loads (in-place tensor ops, "
            "attribute writes on classes or modules): the Sleepy Pickle technique, "
            "which alters a model's weights or code and leaves a clean-looking file.",
        ),
        Rule(
            "TG106",
            "pickle-extension-code",
            _H,
            "The pickle uses the copyreg extension registry (EXT1/EXT2/EXT4), which "
            "resolves to a callable chosen by the loading process. The scanner cannot "
            "know what it calls.",
        ),
        Rule(
            "TG107",
            "pickle-malformed",
            _M,
            "The pickle stream is broken (truncated, invalid opcode or inconsistent "
            "stack). A loader runs everything before the break and then fails; what "
            "came before the break was analysed and is reported separately.",
        ),
        Rule(
            "TG108",
            "pickle-trailing-data",
            _L,
            "Bytes follow the pickle's STOP opcode and are not another pickle. Loaders "
            "ignore them, but they can hide a second payload for a custom reader.",
        ),
        Rule(
            "TG109",
            "pickle-persistent-id",
            _L,
            "The pickle refers to objects by persistent id outside a PyTorch "
            "checkpoint; what they resolve to depends on the loading code.",
        ),
        Rule(
            "TG110",
            "pickle-nested",
            _H,
            "The pickle carries a byte string that is itself a pickle with findings "
            "(reported with the nested offset). A nested pickle.loads would run it.",
        ),
        # -- containers -----------------------------------------------------
        Rule(
            "TG201",
            "zip-crc-mismatch",
            _M,
            "A zip member's CRC does not match its data. PyTorch loads such files "
            "while Python's zipfile refuses them, which has blinded scanners "
            "(picklescan CVE-2025-10156).",
        ),
        Rule(
            "TG202",
            "zip-name-mismatch",
            _H,
            "A zip member's local header names a different file than the central "
            "directory. Readers disagree about which member is which, an evasion "
            "used against scanners (picklescan CVE-2025-1944).",
        ),
        Rule(
            "TG203",
            "zip-flag-bits",
            _M,
            "A zip member sets unusual general-purpose flag bits (e.g. encryption) "
            "that PyTorch ignores but other readers refuse (picklescan CVE-2025-1945).",
        ),
        Rule(
            "TG204",
            "zip-duplicate-name",
            _H,
            "Two zip members share a name; readers pick different ones.",
        ),
        Rule(
            "TG205",
            "archive-too-deep",
            _H,
            "Archives are nested deeper than the limit; the innermost ones were not scanned.",
        ),
        Rule(
            "TG206",
            "archive-bomb",
            _H,
            "A member decompresses past the size or ratio limit (a decompression "
            "bomb); the rest of it was not scanned.",
        ),
        Rule(
            "TG207",
            "archive-path-escape",
            _H,
            "An archive member's path is absolute or climbs out of the extraction "
            "folder (zip-slip), or is a link pointing outside it.",
        ),
        Rule(
            "TG208",
            "archive-not-inspected",
            _H,
            "The archive could not be opened for inspection (its format needs an "
            "optional extra that is not installed, or it is encrypted). Its content "
            "is unknown, so it is not reported as clean.",
        ),
        Rule(
            "TG209",
            "archive-too-many-members",
            _H,
            "The archive holds more members than the limit; the rest were not scanned.",
        ),
        Rule(
            "TG210",
            "zip-ambiguous",
            _H,
            "The zip's structure lets two readers see different content (several end "
            "records or central directories, hidden or overlapping entries, data in "
            "front of the archive). Scanners have been evaded this way; the members "
            "every reader could see were all scanned.",
        ),
        Rule(
            "TG211",
            "zip-irregular",
            _L,
            "The zip is damaged or unusual (sizes that disagree, unreferenced or "
            "trailing bytes, a missing central directory) but nothing suggests two "
            "readers would disagree about its content.",
        ),
        # -- numpy ----------------------------------------------------------
        Rule(
            "TG301",
            "numpy-object-array",
            _L,
            "A .npy array of Python objects: numpy.load needs allow_pickle=True, which "
            "unpickles the embedded stream (analysed and reported separately).",
        ),
        Rule(
            "TG302",
            "numpy-bad-header",
            _M,
            "The .npy header is malformed or inconsistent with the file size.",
        ),
        # -- seal: signatures and manifests (TG5xx) ---------------------------
        Rule("TG501", "signature-invalid", _C,
             "The signature does not verify with the given public key: it was made "
             "with another key, or the signed manifest was edited after signing. "
             "Nothing it lists can be trusted; re-seal only from a trusted copy."),
        Rule("TG502", "signature-malformed", _C,
             "The signature file is not a readable Sigstore bundle carrying a "
             "model-signing v1 manifest (truncated, corrupted, wrong media or "
             "payload type, unsupported hash or serialization)."),
        Rule("TG503", "sealed-file-modified", _C,
             "A file's content differs from the digest in the signed manifest (the "
             "evidence shows both hex digests and sizes). Someone changed it after "
             "it was sealed."),
        Rule("TG504", "sealed-file-added", _H,
             "A file exists that the signed manifest does not list. Loaders may pick "
             "it up (an extra checkpoint shard, a config, code)."),
        Rule("TG505", "sealed-file-removed", _H,
             "A file listed in the signed manifest is missing."),
        Rule("TG506", "sealed-file-renamed", _H,
             "A listed file is missing and an unlisted file has exactly its content: "
             "it was renamed or moved (or two files swapped names)."),
        Rule("TG507", "seal-unsafe-path", _H,
             "A symbolic link, special file or path that escapes the sealed folder. "
             "Sealing refuses to follow it and verification reports it, since it "
             "would let content outside the folder pass as sealed."),
        # -- environment verification (TG6xx) ----------------------------------
    )
}


def rule(rule_id: str) -> Rule:
    return RULES[rule_id]


def rules_markdown() -> str:
    lines = [
        "# Rules",
        "",
        "Every finding names one of these ids. Ids are stable; severities are the",
        "defaults, which a policy file may change (see `docs/policy.md`).",
        "Generated by `trainguard rules --markdown`; do not edit by hand.",
        "",
        "| id | name | default severity | what it means and what to do |",
        "|---|---|---|---|",
    ]
    for r in RULES.values():
        lines.append(f"| {r.id} | {r.title} | {r.severity} | {r.help} |")
    return "\n".join(lines) + "\n"
