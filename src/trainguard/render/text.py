"""The human report: a header per file that needs attention, a line per finding.

Clean files are only counted, so that a scan of a large model folder shows what
matters and little else.  Everything shown that came from a scanned file (paths,
member names, triggers, error texts) goes through :func:`printable` first.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.render.options import Options
from trainguard.rules import RULES

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

# A line as (text, style) pieces: drawn by rich, or joined as plain text when
# the report has nothing to tabulate and no colour is wanted (a clean scan of a
# large checkpoint then never imports rich, a third of its start-up).
Pieces = list[tuple[str, str]]

WIDTH = 100
# Past this many, info findings (chiefly TG001, a file in no known format) are
# counted per rule instead of listed: a checkpoint folder full of tokenizer and
# config files would otherwise bury the findings that matter.
INFO_LISTED_MAX = 3

SEVERITY_STYLE: dict[Severity, str] = {
    Severity.CRITICAL: "bold white on red",
    Severity.HIGH: "bold red",
    Severity.MEDIUM: "yellow",
    Severity.LOW: "cyan",
    Severity.INFO: "dim",
}

_DESCENDING = sorted(Severity, reverse=True)
# A grid pads every row to its widest one; the padding (before any closing style
# codes) is dropped so that lines end where their text does.
_TRAILING_BLANKS = re.compile(r" +(?=(?:\x1b\[[0-9;]*m)*$)", re.MULTILINE)


def printable(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape.

    Names inside a model file are attacker-chosen.  Printed raw, an ANSI escape
    could move the cursor and overwrite a finding, a newline could forge a whole
    report line and a bidi override could make a name read as another one.
    """
    if text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            # A byte that os.fsdecode could not decode (surrogateescape): show the byte.
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _rich(pieces: Pieces) -> Text:
    from rich.text import Text

    text = Text()
    for chunk, style in pieces:
        text.append(chunk, style=style)
    return text


def _plain(pieces: Pieces) -> str:
    return "".join(chunk for chunk, _ in pieces)


def _counts(severities: Iterable[Severity], *, styled: bool = True) -> Pieces:
    """``2 critical, 1 high``: highest first, zero counts left out."""
    tally = Counter(severities)
    pieces: Pieces = []
    for sev in _DESCENDING:
        if tally[sev]:
            if pieces:
                pieces.append((", ", ""))
            pieces.append((f"{tally[sev]} {sev}", SEVERITY_STYLE[sev] if styled else ""))
    return pieces


def _header(result: FileResult) -> Text:
    from rich.text import Text

    text = Text()
    text.append(printable(result.path), style="bold")
    size = f"{result.size:,} byte{'' if result.size == 1 else 's'}"
    text.append(f"  {printable(result.format)}, {size}", style="dim")
    return text


def _describe(finding: Finding, path: str) -> Text:
    from rich.text import Text

    where = finding if finding.file else replace(finding, file=path)
    text = Text()
    text.append(printable(where.location), style="bold")
    text.append("  ")
    text.append(printable(finding.message))
    # Most messages already name the trigger; repeating it would only add noise.
    if finding.trigger and finding.trigger not in finding.message:
        text.append("  [")
        text.append(printable(finding.trigger), style="bold")
        text.append("]")
    return text


def _findings_table(findings: list[Finding], path: str) -> Table:
    # A grid keeps one row per finding and wraps a long message under its own
    # column instead of under the severity.
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=1)
    grid.add_column(no_wrap=True, min_width=len("critical"))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for finding in sorted(findings, key=lambda f: f.severity, reverse=True):
        sev = Severity(finding.severity)
        grid.add_row(
            "",
            Text(str(sev), style=SEVERITY_STYLE[sev]),
            Text(printable(finding.rule)),
            _describe(finding, path),
        )
    return grid


def _error_line(error: str) -> Text:
    from rich.text import Text

    text = Text("  ")
    text.append("scan incomplete:", style="bold magenta")
    text.append(f" {printable(error)}")
    return text


def _info_summary(infos: list[Finding]) -> Text:
    from rich.text import Text

    per_rule = Counter(f.rule for f in infos)
    parts = []
    for rule_id, count in sorted(per_rule.items()):
        known = RULES.get(rule_id)
        name = f"{rule_id} {known.title}" if known else rule_id
        parts.append(f"{printable(name)}: {count}")
    text = Text(f"{_plural(len(infos), 'info finding')} not listed ", style="dim")
    text.append(f"({'; '.join(parts)}); the JSON and SARIF reports list them all.", style="dim")
    return text


def _summary(report: ScanReport) -> Pieces:
    pieces: Pieces = [(f"{_plural(len(report.files), 'file')} scanned: ", "")]
    pieces += _counts(f.severity for f in report.findings) or [("no findings", "")]
    if report.errors:
        pieces.append(("; ", ""))
        pieces.append((f"{_plural(len(report.errors), 'error')} (scan incomplete)", "magenta"))
    return pieces


def _verdict(report: ScanReport) -> Pieces:
    threshold = str(report.fail_on)
    if report.failed:
        failing = (f.severity for f in report.findings if f.severity >= report.fail_on)
        return [
            ("FAIL", "bold red"),
            (": ", ""),
            *_counts(failing, styled=False),
            (f" (failing at >= {threshold})", ""),
        ]
    if report.errors:
        return [
            ("INCOMPLETE", "bold magenta"),
            (
                f": {_plural(len(report.errors), 'file')} could not be scanned to the end; "
                f"no findings at or above {threshold} in what was read",
                "",
            ),
        ]
    return [("OK", "bold green"), (f": no findings at or above {threshold}", "")]


def render_text(report: ScanReport, *, color: bool = False) -> str:
    """The report for a person at a terminal; ANSI styles only when ``color``."""
    lines = [_summary(report), _verdict(report)]
    if not color and not report.findings and not report.errors:
        plain = [_plain(line) for line in lines]
        if all(len(line) <= WIDTH for line in plain):  # nothing for rich to wrap
            return "".join(line + "\n" for line in plain)
    return _render_rich(report, lines, color=color)


def _render_rich(report: ScanReport, lines: list[Pieces], *, color: bool) -> str:
    from rich.console import Console

    out = io.StringIO()
    # Every setting is explicit so that the environment (COLUMNS, FORCE_COLOR,
    # Jupyter) cannot change what a given report renders to.
    console = Console(
        file=out,
        width=WIDTH,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=not color,
        force_jupyter=False,
        legacy_windows=False,
        markup=False,
        emoji=False,
        highlight=False,
    )
    infos = [f for f in report.findings if f.severity == Severity.INFO]
    hide_infos = len(infos) > INFO_LISTED_MAX
    for result in report.files:
        shown = [f for f in result.findings if not (hide_infos and f.severity == Severity.INFO)]
        if not shown and result.error is None:
            continue
        console.print(_header(result))
        if shown:
            console.print(_findings_table(shown, result.path))
        if result.error is not None:
            console.print(_error_line(result.error))
        console.print()
    if hide_infos:
        console.print(_info_summary(infos))
    for line in lines:
        console.print(_rich(line))
    return _TRAILING_BLANKS.sub("", out.getvalue())


def draw(report: ScanReport, options: Options) -> str:
    return render_text(report, color=options.color)
