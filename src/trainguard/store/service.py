"""``trainguard store watch``: a guard over a shared checkpoint folder.

Each new or changed file is scanned once its writer is done, files that fail
the policy are moved (never deleted) to a quarantine folder with a note of
why, and every verdict is recorded, so a restart rescans nothing unchanged.
Polling is the baseline because shared filesystems (NFS, Lustre) deliver no
change events for other clients' writes; where the ``watchdog`` library is
installed, local events only wake the loop early.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainguard.errors import UsageError
from trainguard.findings import FileResult, Severity
from trainguard.scanner.policy import Policy
from trainguard.scanner.walk import WalkOptions, walk
from trainguard.store.metrics import StoreMetrics
from trainguard.store.verdicts import StatKey, Verdict, VerdictStore, db_name, shown, stat_key
from trainguard.store.writers import open_for_writing

ScanFn = Callable[[str], FileResult]
# The quarantine note beside each moved file.
NOTE_SUFFIX = ".trainguard.json"


@dataclass
class StoreOptions:
    root: str
    quarantine: str
    fail_on: Severity = Severity.HIGH
    policy: Policy | None = None
    # A file is scanned once its stat has not changed for this long (and no
    # local process holds it open for writing), or at once if it was last
    # modified longer ago than this (a file at rest when the guard starts).
    settle: float = 2.0
    interval: float = 1.0
    # A file some local process keeps open for writing is waited for at most this
    # long; meanwhile it is scanned provisionally, and a critical finding (code
    # that runs on load) quarantines it at once, so holding a descriptor open
    # cannot keep a payload in the store.
    writer_deadline: float = 300.0


@dataclass
class _Pending:
    key: StatKey
    since: float


@dataclass
class StoreGuard:
    options: StoreOptions
    verdicts: VerdictStore
    scan_fn: ScanFn | None = None
    metrics: StoreMetrics = field(default_factory=StoreMetrics)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _decided: dict[str, StatKey] = field(default_factory=dict)
    _provisional: dict[str, StatKey] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the latest problems, for the CLI to show
    wake: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        root, quarantine = Path(self.options.root), Path(self.options.quarantine)
        if not root.is_dir():
            raise UsageError(f"{root}: not a folder")
        quarantine.mkdir(parents=True, exist_ok=True)
        if root.resolve() == quarantine.resolve():
            raise UsageError("the quarantine folder cannot be the store itself")
        self._root = root.resolve()
        self._quarantine = quarantine.resolve()
        if self.scan_fn is None:
            from trainguard.scanner.engine import scan_file

            policy = self.options.policy or Policy()
            self.scan_fn = lambda path: scan_file(path, policy=policy)

    # -- one pass --------------------------------------------------------------------------

    def poll(self) -> list[Verdict]:
        """Look at every file once; scan those that are ready. Returns the new verdicts."""
        now = time.monotonic()
        ready: dict[str, tuple[str, StatKey]] = {}
        present: set[str] = set()
        for full, rel in self._files():
            try:
                st = os.stat(full)  # a symlink is judged by what a loader would open
            except OSError:
                continue
            if not _regular(st.st_mode):
                continue
            present.add(rel)
            key = stat_key(st)
            if self._known(rel) == key:
                continue
            pend = self._pending.get(rel)
            if pend is None or pend.key != key:
                self._pending[rel] = _Pending(key, now)
                at_rest = time.time() - st.st_mtime >= self.options.settle
                if not at_rest:
                    continue
            elif now - pend.since < self.options.settle:
                continue
            ready[rel] = (full, key)
        for gone in set(self._pending) - present:
            del self._pending[gone]
        busy = open_for_writing({(k[0], k[1]) for _, k in ready.values()})
        decided = []
        for rel, (full, key) in ready.items():
            waited = now - self._pending[rel].since
            # A writer still at work: look provisionally (a payload is quarantined at
            # once); decide for good once it is done or past the deadline.
            provisional = (key[0], key[1]) in busy and waited < self.options.writer_deadline
            if provisional and self._provisional.get(rel) == key:
                continue
            try:
                verdict = self._decide(rel, full, key, provisional=provisional)
            except Exception as exc:  # one file's trouble never stops the guard
                self._note_error(f"{db_name(rel)}: {type(exc).__name__}: {exc}")
                continue
            if verdict is not None:
                decided.append(verdict)
        self.metrics.set_pending(len(self._pending))
        self.metrics.polled()
        return decided

    def _note_error(self, message: str) -> None:
        self.metrics.failed()
        self.errors = [*self.errors[-99:], message]

    def _files(self) -> list[tuple[str, str]]:
        """Every file a loader could open under the root, folder links included.

        The scanner's walk, following folder links (a link back up the tree ends
        there) and never entering the quarantine.
        """
        options = WalkOptions(follow_symlinks=True, prune=frozenset({str(self._quarantine)}))
        out: list[tuple[str, str]] = []
        for walked in walk([self._root], options):
            if walked.loop:
                continue
            if walked.path.is_dir():  # the walk hands back a folder it could not list
                self._note_error(f"{db_name(str(walked.path))}: cannot list this folder")
                continue
            out.append((str(walked.path), walked.path.relative_to(self._root).as_posix()))
        return out

    def _known(self, rel: str) -> StatKey | None:
        if rel not in self._decided:
            known = self.verdicts.known(db_name(rel))
            if known is None:
                return None
            self._decided[rel] = known
        return self._decided[rel]

    # -- one file --------------------------------------------------------------------------

    def _decide(
        self, rel: str, full: str, key: StatKey, *, provisional: bool = False
    ) -> Verdict | None:
        assert self.scan_fn is not None
        started = time.monotonic()
        result = self.scan_fn(full)
        self.metrics.scanned(time.monotonic() - started)
        if not self._unchanged(full, key):
            # Replaced or still growing while it was read: what was scanned is not
            # what is there now, so no verdict; the file is looked at again.
            self._requeue(rel, full)
            return None
        severity = max((f.severity for f in result.findings), default=None)
        failing = result.error is not None or (
            severity is not None and severity >= self.options.fail_on
        )
        if provisional:
            # Half-written files are often unreadable or truncated; only a payload
            # that would run is enough to act before the writer is done.
            self._provisional[rel] = key
            if severity is not Severity.CRITICAL:
                return None
        findings: list[dict[str, object]] = [
            {
                "rule": f.rule,
                "severity": str(f.severity),
                "message": shown(f.message),
                "at": shown(f.location),
            }
            for f in result.findings
        ]
        if result.error is not None:
            findings.append({"rule": "error", "severity": "high", "message": shown(result.error)})
        moved_to = ""
        if failing:
            moved = self._quarantine_file(rel, full, key, findings)
            if moved is None:
                self._requeue(rel, full)
                return None
            moved_to = shown(moved)
        self._provisional.pop(rel, None)
        verdict = Verdict(
            db_name(rel),
            key,
            "quarantined" if failing else "clean",
            str(severity) if severity is not None else "",
            findings,
            moved_to,
        )
        self.verdicts.record(verdict)
        self._decided[rel] = key
        self._pending.pop(rel, None)
        self.metrics.decided(verdict.outcome)
        return verdict

    def _requeue(self, rel: str, full: str) -> None:
        self.metrics.rescans += 1
        try:
            self._pending[rel] = _Pending(stat_key(os.stat(full)), time.monotonic())
        except OSError:  # gone: nothing left to judge
            self._pending.pop(rel, None)

    @staticmethod
    def _unchanged(full: str, key: StatKey) -> bool:
        try:
            return stat_key(os.stat(full)) == key
        except OSError:
            return False

    def _target(self, rel: str) -> Path:
        """Where a quarantined file goes: its own relative path, unless something is in the way.

        A later file under a quarantined name (``a`` moved, then ``a/evil.pkl``
        written) cannot mirror its path; it goes to a flat folder instead of
        stopping the guard.
        """
        target = self._quarantine / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            mirrored = target.parent.is_dir()
        except OSError:
            mirrored = False
        if not mirrored:
            flat = self._quarantine / ".collisions"
            flat.mkdir(exist_ok=True)
            target = flat / rel.replace("/", "%2F")
        base, n = target, 0
        while os.path.lexists(target) or os.path.lexists(str(target) + NOTE_SUFFIX):
            n += 1
            target = base.with_name(f"{base.name}.{n}")
        return target

    def _quarantine_file(
        self, rel: str, full: str, key: StatKey, findings: list[dict[str, object]]
    ) -> str | None:
        target = self._target(rel)
        if not self._unchanged(full, key):
            return None
        try:
            os.rename(full, target)  # same filesystem: atomic, keeps the bytes as they were
        except OSError:
            shutil.move(full, target)  # another filesystem: copied, then removed
        note = {
            "path": db_name(rel),
            "quarantined_at": time.time(),
            "why": findings,
            "stat": {"size": key[2], "mtime_ns": key[3]},
        }
        Path(str(target) + NOTE_SUFFIX).write_text(json.dumps(note, indent=2, sort_keys=True))
        return str(target)

    # -- loops -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; an event source may set ``wake`` to poll early."""
        while not stop.is_set():
            self.poll()
            self.wake.wait(self.options.interval)
            self.wake.clear()

    def once(self, *, max_wait: float = 600.0) -> list[Verdict]:
        """Scan what is there now and return; files still being written are waited for."""
        verdicts = self.poll()
        deadline = time.monotonic() + max_wait
        while self._pending and time.monotonic() < deadline:
            time.sleep(min(self.options.interval, self.options.settle))
            verdicts += self.poll()
        return verdicts


def _regular(mode: int) -> bool:
    return stat.S_ISREG(mode)
