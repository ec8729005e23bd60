"""The anchor file: rank 0's run key id, kept by the user outside the ledger.

Every stream names its own run key, so whoever can write the database can
rewrite a run whole (alerts dropped, re-hashed, heads re-signed under a key of
their own) or strip its keys so that it looks unsigned, and the ledger alone
stays consistent (red team 4, A1 and A2b).  What closes that by default is a
record the database's writers cannot reach: at watch start rank 0 appends one
JSON line (run id, ledger location, its run key id, signed or not, time) to a
file the user owns, and ``ledger verify`` pins rank 0's key from it (trust on
first use: the first record of the run, written before any training step).

The file is ``$TRAINGUARD_ANCHORS``, else ``$XDG_STATE_HOME/trainguard/anchors.jsonl``
(``~/.local/state/...``); ``TRAINGUARD_ANCHORS=off`` turns it off.  Its trust
boundary is the user's home: someone who can write it can rewrite the anchor
too; pinning the key id off the host (``--expect-key-id``, the id watch logs at
start) stays the strong form.  Many runs append at once: each entry is one
``O_APPEND`` write of one short line, which POSIX keeps whole on a local disk.

The file rotates itself into an archive folder of buckets by run id before it nears
the read caps (:mod:`.anchorrotate`); a run is looked up in the file and its bucket.
Reading is bounded (:data:`MAX_ANCHOR_BYTES`, :data:`MAX_ANCHOR_LINES`,
:data:`MAX_LINE_BYTES`); a file that cannot be read, is over a cap or writable
by others is a high finding (TG1216), lines that are no entry a medium one;
nothing in the file ever raises.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainguard.findings import Finding, Severity
from trainguard.ledger import anchorrotate
from trainguard.ledger.chain import RUN_STREAM, is_hex_digest
from trainguard.rules import rule

ANCHORS_ENV = "TRAINGUARD_ANCHORS"
OFF_VALUES = ("off", "none", "0", "false")
ANCHOR_VERSION = 1
# About 300 bytes a run: 64 MiB is ~200,000 runs; past it the user rotates the file.
MAX_ANCHOR_BYTES = 64 << 20
MAX_ANCHOR_LINES = 250_000
# One entry, written whole by one write (the run id is the only long field).
MAX_LINE_BYTES = 4096
MAX_NAMED_LINES = 20  # malformed line numbers one finding lists


def default_path() -> Path | None:
    """Where anchors go: ``$TRAINGUARD_ANCHORS``, else the user's state dir; None when off."""
    given = os.environ.get(ANCHORS_ENV)
    if given is not None:
        return None if given.strip().lower() in OFF_VALUES or not given.strip() else Path(given)
    state = os.environ.get("XDG_STATE_HOME")
    if not state:
        try:
            state = str(Path.home() / ".local" / "state")
        except RuntimeError:  # no home to resolve: no default place (say so, never crash)
            return None
    return Path(state) / "trainguard" / "anchors.jsonl"


def ledger_place(location: str) -> str:
    """A ledger's location as anchors compare it: a file by its resolved path, a URL as is."""
    if "://" in location and not location.startswith("sqlite:///"):
        return location  # postgresql://...; the store's location holds no password
    path = location[len("sqlite:///") :] if location.startswith("sqlite:///") else location
    return os.path.realpath(path.partition("?")[0])


def write_anchor(path: Path, run_id: str, location: str, key_id: str | None) -> None:
    """Append this run's anchor line (raises OSError or ValueError; the caller warns)."""
    entry = {
        "v": ANCHOR_VERSION,
        "run_id": run_id,
        "ledger": ledger_place(location),
        "key_id": key_id,
        "signed": key_id is not None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pid": os.getpid(),
    }
    line = (json.dumps(entry, ensure_ascii=True, sort_keys=True) + "\n").encode("ascii")
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"the anchor line is over {MAX_LINE_BYTES} bytes (run id too long)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    size = anchorrotate.append_line(path, line)
    if size >= anchorrotate.ROTATE_BYTES or anchorrotate.leftovers(path):
        try:
            anchorrotate.rotate(path)
        except anchorrotate.RotationError as exc:  # the caller warns: say what did happen
            raise anchorrotate.RotationError(f"the anchor line is written, but {exc}") from exc


_foreign = anchorrotate.foreign


@dataclass(frozen=True)
class Entry:
    line: int
    run_id: str
    ledger: str
    key_id: str | None
    time: str


@dataclass
class AnchorPin:
    """What the anchor file says about one run, for ``ledger verify``."""

    path: Path | None
    run_id: str = ""
    location: str = ""
    entries: list[Entry] = field(default_factory=list)  # this run, this ledger
    elsewhere: list[Entry] = field(default_factory=list)  # this run id, another ledger
    findings: list[Finding] = field(default_factory=list)  # the file's own problems

    @property
    def key_ids(self) -> list[str] | None:
        """rank 0's key ids to pin; None when nothing is pinned (no entry, or unsigned)."""
        ids = [e.key_id for e in self.entries if e.key_id is not None]
        return ids or None

    @property
    def unsigned(self) -> bool:
        """Every entry for this run says it started unsigned (sign_key=False)."""
        return bool(self.entries) and all(e.key_id is None for e in self.entries)

    def source(self) -> str:
        lines = ", ".join(str(e.line) for e in self.entries[:MAX_NAMED_LINES])
        first = self.entries[0].time if self.entries else "?"
        return f"the anchor {self.path} (line {lines}, written by watch at start, {first})"

    def note(self) -> str:
        """One status line for stderr: which anchor pinned the run, or why none did."""
        if self.path is None:
            return (
                f"anchor: not read (--no-anchors or {ANCHORS_ENV}=off); rank 0's run key "
                "is taken from the ledger itself"
            )
        if self.entries:
            what = "the run as started unsigned" if self.unsigned else "rank 0's run key id"
            return f"anchor: {what} from {self.source()}"
        where = ""
        if self.elsewhere:
            where = f" (it holds this run id for another ledger: {self.elsewhere[0].ledger})"
        return (
            f"anchor: no entry for this run in {self.path}{where}; rank 0's run key is "
            "taken from the ledger itself (pin it with --expect-key-id)"
        )

    def apply(self, findings: list[Finding], run_keys: dict[int, str]) -> list[Finding]:
        """The verify findings with the anchor's own: where the pin came from, said in
        each TG1213, and a run recorded unsigned that now carries a key."""
        out = list(self.findings)
        pinned = self.key_ids is not None
        for f in findings:
            if pinned and f.rule == "TG1213":
                said = f.message.replace("(--expect-key-id)", "(by the anchor file)")
                f = replace(f, message=f"{said} [rank 0's key pinned by {self.source()}]")
            out.append(f)
        zero = run_keys.get(0)
        if self.unsigned and zero is not None:
            out.append(
                Finding(
                    rule="TG1213",
                    severity=rule("TG1213").severity,
                    message=f"{self.source()} records this run as started unsigned "
                    f"(sign_key=False), but stream 0 now carries run key {zero[:16]}: the "
                    "stream was rewritten whole under a key of someone else's",
                    file=self.location,
                    member=f"run {self.run_id} stream 0",
                    offset=0,
                    evidence={"key_id": zero},
                )
            )
        return out


def read_pin(path: Path | None, run_id: str, location: str) -> AnchorPin:
    """The anchor entries for ``run_id`` in the ledger at ``location``: in the anchor
    file, in the one archive bucket its rotations filed the run id under, and in what an
    interrupted rotation left (:mod:`.anchorrotate`).  Never raises; a file that cannot
    be used pins nothing at all (TG1216 high)."""
    pin = AnchorPin(path, run_id, location)
    if path is None:
        return pin
    files = [path]
    folder = anchorrotate.archive_dir(path)
    if os.path.lexists(folder):
        try:
            info = os.stat(folder)
        except OSError as exc:
            pin.findings.append(_problem(pin, f"archive {folder} cannot be read: {exc}"))
            return pin
        if not stat.S_ISDIR(info.st_mode) or _foreign(info):
            pin.findings.append(
                _problem(pin, f"archive {folder} is not the user's own folder (owner or mode)")
            )
            return pin
        left = anchorrotate.leftovers(path)
        if len(left) > anchorrotate.MAX_LEFTOVERS:
            pin.findings.append(
                _problem(
                    pin,
                    f"archive {folder} holds {len(left)} interrupted rotations "
                    f"(over {anchorrotate.MAX_LEFTOVERS}): the next watch start files them",
                )
            )
            return pin
        files += [anchorrotate.bucket_path(path, run_id), *left]
    bad: list[tuple[Path, int]] = []
    for number, file in enumerate(files):
        # The anchor file itself may be missing right after a rotation moved it.
        if not _read_file(pin, file, ledger_place(location), bad, archived=number > 0):
            pin.entries.clear()
            return pin
    if bad:
        named = ", ".join(
            f"{n}" if f == path else f"{f.name}:{n}" for f, n in bad[:MAX_NAMED_LINES]
        )
        more = f" and {len(bad) - MAX_NAMED_LINES} more" if len(bad) > MAX_NAMED_LINES else ""
        pin.findings.append(
            _problem(
                pin,
                f"holds {len(bad)} line(s) that are no anchor entry (line {named}{more}): "
                "one of them may have been this run's, which then is not anchored",
                Severity.MEDIUM,
            )
        )
    return pin


def _read_file(
    pin: AnchorPin, path: Path, place: str, bad: list[tuple[Path, int]], archived: bool
) -> bool:
    """Add ``path``'s entries for the pin's run to it; False (with a TG1216 high finding)
    when the file cannot be used.  A missing file holds nothing."""
    what = f"archive file {path} " if archived else ""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError as exc:
        pin.findings.append(_problem(pin, f"{what}cannot be opened: {exc.strerror or exc}"))
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            pin.findings.append(_problem(pin, f"{what}is not a regular file"))
            return False
        if _foreign(info):
            pin.findings.append(
                _problem(pin, f"{what}is owned by someone else or writable by group or others")
            )
            return False
        if info.st_size > MAX_ANCHOR_BYTES:
            pin.findings.append(_problem(pin, f"{what}is over {MAX_ANCHOR_BYTES} bytes"))
            return False
        with os.fdopen(os.dup(fd), "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number > MAX_ANCHOR_LINES:
                    pin.findings.append(_problem(pin, f"{what}has over {MAX_ANCHOR_LINES} lines"))
                    return False
                entry = _entry(raw, number)
                if entry is None:
                    bad.append((path, number))
                elif entry.run_id == pin.run_id:
                    (pin.entries if entry.ledger == place else pin.elsewhere).append(entry)
    except OSError as exc:
        pin.findings.append(_problem(pin, f"{what}cannot be read: {exc.strerror or exc}"))
        return False
    finally:
        os.close(fd)
    return True


def _entry(raw: bytes, number: int) -> Entry | None:
    if len(raw) > MAX_LINE_BYTES or not raw.endswith(b"\n"):
        return None  # over the cap, or a torn last line
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("v") != ANCHOR_VERSION:
        return None
    run_id, ledger, key_id = data.get("run_id"), data.get("ledger"), data.get("key_id")
    signed, when = data.get("signed"), data.get("time")
    if not isinstance(run_id, str) or not isinstance(ledger, str) or not isinstance(when, str):
        return None
    if signed is True and isinstance(key_id, str) and is_hex_digest(key_id):
        return Entry(number, run_id, ledger, key_id, when)
    if signed is False and key_id is None:
        return Entry(number, run_id, ledger, None, when)
    return None


def _problem(pin: AnchorPin, what: str, severity: Severity | None = None) -> Finding:
    return Finding(
        rule="TG1216",
        severity=rule("TG1216").severity if severity is None else severity,
        message=f"the anchor file {pin.path} {what}; this run's key is not pinned from it",
        file=pin.location,
        member=f"run {pin.run_id} stream {RUN_STREAM}",
        evidence={"anchor_file": str(pin.path)},
    )
