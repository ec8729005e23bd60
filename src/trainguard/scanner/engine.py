"""The scan loop: paths in, a :class:`ScanReport` out.

For every file: sniff the format by content, let the format yield findings,
recurse into container members through :meth:`ScanContext.scan_child`, then
apply the user's policy.  Whatever goes wrong, the file's result keeps the
findings gathered so far; an error is recorded beside them, never instead.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from trainguard.errors import LimitExceeded, MissingExtraError, ScanError
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.picklevm.probe import Probe
from trainguard.scanner.policy import Policy
from trainguard.scanner.registry import PICKLES, sniff
from trainguard.scanner.repository import RepoFile, analyse_paths, attach
from trainguard.scanner.walk import WalkOptions, excluded, walk

# Called after each file with (files done, files total, path).
Progress = Callable[[int, int, str], None]
# Scans the given files (in order) and yields their results in that order.
Runner = Callable[[Sequence[str]], Iterator[FileResult]]


def _rule_finding(rule_id: str, message: str, member: str = "") -> Finding:
    return finding(rule_id, message, member=member)


class _Scanner:
    def __init__(self, policy: Policy, limits: Limits) -> None:
        self.policy = policy
        self.limits = limits
        self.formats: list[str] = []
        self.deadline: float | None = None
        self.nesting = 0

    def context(self) -> ScanContext:
        return ScanContext(
            self.limits,
            self.policy.allow_globals,
            self.deadline,
            self.scan_child,
            self.scan_nested_bytes,
            self.formats,
        )

    def scan_child(self, blob: Blob) -> Iterator[Finding]:
        if blob.depth > self.limits.max_archive_depth:
            yield _rule_finding(
                "TG205",
                f"nested deeper than {self.limits.max_archive_depth} containers; not scanned",
                blob.name,
            )
            return
        with blob.open() as f:
            head = f.read(self.limits.sniff_size)
        if not head and blob.depth == 0:
            yield _rule_finding("TG005", "empty file (0 bytes): nothing to load")
            return
        fmt = sniff(head, blob)
        pickles = PICKLES.target()
        also_pickle = False
        if fmt is not pickles:
            # Decided by what a pickle loader would do, not by magic numbers:
            # pickle.load reads from byte 0 whatever else the bytes are.
            loader = pickles.loader_verdict(self.context(), head, blob)
            if fmt is None and loader is not Probe.REJECTS:
                fmt = pickles
            elif fmt is not None and loader is Probe.EXECUTES:
                also_pickle = True
        if fmt is None:
            if blob.depth == 0:
                yield _rule_finding(
                    "TG001",
                    "format not recognised from content, and no pickle loader would "
                    "accept it; not analysed",
                )
            return
        if len(self.formats) < 8:
            self.formats.append(fmt.name)
        for found in fmt.scan(self.context(), blob):
            yield found if found.member or not blob.name else replace(found, member=blob.name)
        if also_pickle:
            yield _rule_finding(
                "TG111",
                f"the data is a {fmt.name} file and also a pickle stream that pickle.load "
                "or a legacy torch.load would execute from its first byte",
                blob.name,
            )
            for found in pickles.scan(self.context(), blob):
                yield found if found.member or not blob.name else replace(found, member=blob.name)

    def scan_nested_bytes(self, data: bytes, name: str) -> list[Finding]:
        # Pickles nested in pickles nest again: count the levels like containers.
        self.nesting += 1
        try:
            blob = Blob(name, lambda: io.BytesIO(data), len(data), depth=self.nesting)
            return list(self._guarded(blob))
        finally:
            self.nesting -= 1

    def _guarded(self, blob: Blob) -> Iterator[Finding]:
        try:
            yield from self.scan_child(blob)
        except LimitExceeded as exc:
            yield _rule_finding("TG002", str(exc), blob.name)
        except MissingExtraError as exc:
            yield _rule_finding("TG208", str(exc), blob.name)

    def scan_blob(self, path: str, blob: Blob) -> FileResult:
        self.formats = []
        self.deadline = time.monotonic() + self.limits.max_seconds_per_file
        result = FileResult(path=path, format="unknown", size=blob.size or 0)
        try:
            for finding in self._guarded(blob):
                result.findings.append(finding)
        except ScanError as exc:
            result.findings.append(_rule_finding("TG003", str(exc)))
        except OSError as exc:
            result.error = f"cannot read: {exc.strerror or exc}"
        except Exception as exc:  # a bug must never read as "clean"
            result.error = f"internal error ({type(exc).__name__}): {exc}"
        result.findings = [replace(f, file=path) for f in self.policy.apply(result.findings)]
        if self.formats:
            rest = [f for f in dict.fromkeys(self.formats[1:]) if f != self.formats[0]]
            result.format = self.formats[0] + (f" ({', '.join(rest)})" if rest else "")
        return result


def scan_file(
    path: str | os.PathLike[str], *, policy: Policy | None = None, limits: Limits = DEFAULT_LIMITS
) -> FileResult:
    return _Scanner(policy or Policy(), limits).scan_blob(str(path), _file_blob(Path(path)))


def scan_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    policy: Policy | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> FileResult:
    blob = Blob("", lambda: io.BytesIO(data), len(data))
    return _Scanner(policy or Policy(), limits).scan_blob(name, blob)


def scan_pickle_bytes(
    data: bytes,
    *,
    member: str = "",
    persistent_ids_expected: bool = False,
    policy: Policy | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Finding]:
    """Findings for one pickle stream held in memory (the safe loader's pre-check).

    The caller unpickles these very bytes afterwards, so what was analysed is
    exactly what is loaded.
    """
    from trainguard.scanner.formats.pickles import scan_pickle_stream

    scanner = _Scanner(policy or Policy(), limits)
    scanner.deadline = time.monotonic() + limits.max_seconds_per_file
    blob = Blob(member, lambda: io.BytesIO(data), len(data))
    found = list(
        scan_pickle_stream(scanner.context(), blob, persistent_ids_expected=persistent_ids_expected)
    )
    return (policy or Policy()).apply(found)


def _file_blob(path: Path) -> Blob:
    size = path.stat().st_size if path.exists() else None
    return Blob("", lambda: open(path, "rb"), size)


def scan(
    paths: Iterable[str | os.PathLike[str]],
    *,
    policy: Policy | None = None,
    limits: Limits = DEFAULT_LIMITS,
    fail_on: Severity = Severity.HIGH,
    progress: Progress | None = None,
    walk_options: WalkOptions | None = None,
    runner: Runner | None = None,
) -> ScanReport:
    """Scan files and directories; never executes or imports anything it reads.

    ``runner`` scans the listed files somewhere else (worker processes, a Ray
    cluster: :mod:`trainguard.scanner.parallel`) and yields their results in order.
    """
    scanner = _Scanner(policy or Policy(), limits)
    report = ScanReport(fail_on=fail_on)
    paths = list(paths)
    walk_options = walk_options or WalkOptions()
    walked = list(walk(paths, walk_options))
    # What model repositories (folders) say about their files: remote code, *.py.
    notes = analyse_paths(paths, limits)
    # Looked at once: the runner's results are paired with this list in order, so a
    # file that vanished between two looks must not shift them.
    exists = [not w.loop and _exists(w.path) for w in walked]
    present = [str(w.path) for w, there in zip(walked, exists, strict=True) if there]
    results = (runner or _in_process(scanner))(present)
    for i, item in enumerate(walked):
        path = item.path
        if item.loop:
            report.files.append(
                FileResult(str(path), "symlink", 0, error=f"symlink loop back to {item.loop}")
            )
        elif not exists[i]:
            report.files.append(FileResult(str(path), "missing", 0, error="no such file"))
        else:
            report.files.append(next(results))
            note = notes.pop(str(path), None)
            if note is not None:
                attach(report.files[-1], note, scanner.policy)
        if progress is not None:
            progress(i + 1, len(walked), str(path))
    for path_text, note in notes.items():  # a file the walk did not list
        if not excluded(path_text, paths, walk_options):
            report.files.append(_noted_result(path_text, note, scanner.policy))
    return report


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _in_process(scanner: _Scanner) -> Runner:
    return lambda present: (scanner.scan_blob(p, _file_blob(Path(p))) for p in present)


def _noted_result(path: str, note: RepoFile, policy: Policy) -> FileResult:
    result = FileResult(path, note.format, 0)
    attach(result, note, policy)
    return result
