"""Every output, fed attacker-chosen names: in HTML they come out as text, never as markup;
in text as visible escapes; in JSON as ASCII that reads back to the very same names.

Tensor paths, file names, run ids, alert messages and evidence reach the pages
from checkpoints and ledgers that the attacker wrote.  Each run composes fresh
hostile strings (quotes, tags, ``</style>``, ``javascript:``, NULs, bidi
controls, very long ones) from a new seed, printed so that a failure can be
replayed with ``TRAINGUARD_TEST_SEED``.  Each string carries a unique token;
the page is parsed with :mod:`html.parser` and no token may appear in a tag
name, an attribute name or an attribute value: every one must be found whole
(as its visible escape) in the page's text.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from collections.abc import Callable
from html.parser import HTMLParser

import pytest

from trainguard.explain.diff.result import DiffReport, SideInfo, TensorDiff, ValueDiff
from trainguard.explain.replay.result import Divergence, FieldDiff, ReplayReport, Segment
from trainguard.explain.report.build import (
    AlertEntry,
    EnvironmentStatus,
    Marker,
    RankTimeline,
    RunInfo,
    RunReport,
    Verification,
)
from trainguard.explain.report.diffs import CheckpointDiff, TensorChange
from trainguard.explain.verifier.follow import Summary, Verdict
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.monitor.conditions import ConditionDiff
from trainguard.render import _RENDERERS, kind_of, render
from trainguard.render.html_page import CSS, csp
from trainguard.render.text import printable

PIECES = [
    '"',
    "'",
    "`",
    "<",
    ">",
    "&",
    "&amp;",
    "&#60;",
    "<script>alert(1)</script>",
    "</style>",
    "</title>",
    "</textarea>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "javascript:alert(1)",
    '" onmouseover="alert(1)',
    "' style='x:expression(1)",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    '<a href="javascript:x">',
    "\x00",
    "\x1b[2J",
    "\n",
    "\r",
    "\t",
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u200b",  # zero width space
    "\ufeff",
    "\udc80",  # a byte os.fsdecode could not decode
    "é",
    "名",
    "🙂",
    " ",
    "/",
    "=",
]
SEVERITIES = [str(s) for s in Severity]
# What the renderers write; a tag outside this set came from somewhere else.
TAGS = {
    *"html head meta title style body header nav main section footer h1 h2 h3 p ul li a".split(),
    *"code strong br span dl dt dd table caption thead tbody tr th td figure figcaption".split(),
    *"svg rect line text path g polyline circle desc".split(),
}


def seed() -> int:
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED") or secrets.randbits(32))
    print(f"hostile-name seed: {seed} (rerun with TRAINGUARD_TEST_SEED={seed})")
    return seed


class Names:
    """Hostile strings, each holding a unique token; ``issued`` lists those the page shows."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.issued: list[str] = []
        self.count = 0

    def __call__(self, shown: bool = True) -> str:
        """A new name; ``shown`` False for a field the page does not display (whole)."""
        self.count += 1
        token = f"TOK{self.count:05d}X"
        parts = self.rng.choices(PIECES, k=self.rng.randint(1, 8))
        if self.rng.random() < 0.1:
            parts.append(self.rng.choice(PIECES) * self.rng.randint(500, 3000))
        cut = self.rng.randint(0, len(parts))
        text = "".join(parts[:cut]) + token + "".join(parts[cut:])
        if shown:
            self.issued.append(text)
        return text


def _finding(name: Names, rng: random.Random, *, evidence_shown: bool) -> Finding:
    return Finding(
        rule=name(),
        severity=rng.choice(list(Severity)),
        message=name(),
        file=name(shown=False),
        member=name(),
        offset=rng.choice([None, rng.randint(0, 99)]),
        trigger=name(shown=False),
        evidence={name(evidence_shown): name(evidence_shown) for _ in range(rng.randint(0, 2))},
    )


def diff_report(name: Names, rng: random.Random) -> DiffReport:
    side = lambda: SideInfo(name(), name(), 10, 2, 8, rng.random() < 0.5)  # noqa: E731
    report = DiffReport(side(), side())
    for status in ("same", "changed", "added", "removed", "retyped", "reshaped"):
        t = TensorDiff(name(), status, name(), name(), (2, 3), (3, 2), 6, 1 if status else 0)
        t.l2_a, t.l2_diff, t.max_abs, t.cosine = 1.0, 0.5, 0.25, 0.9
        report.tensors.append(t)
    report.values = [ValueDiff(name(), rng.choice(["same", "changed"]), name(), name())]
    report.findings = [_finding(name, rng, evidence_shown=True) for _ in range(rng.randint(1, 3))]
    report.notes = [name()]
    return report


def run_report(name: Names, rng: random.Random) -> RunReport:
    timeline = RankTimeline(0)
    for step in range(10):
        timeline.metrics["loss"].add(step, 1.0 / (step + 1))
    timeline.steps, timeline.first_step, timeline.last_step = 10, 0, 9

    def alert(step: int) -> AlertEntry:
        evidence = [(name(), name()) for _ in range(rng.randint(0, 2))]
        severity = name() if rng.random() < 0.3 else rng.choice(SEVERITIES)
        return AlertEntry(step, 0, step, name(), name(), severity, name(), evidence, step != 5)

    alerts = [alert(s) for s in (3, 4, 5, 7)]
    verification = Verification(
        records=20,
        streams=2,
        signatures_checked=rng.random() < 0.5,
        signed_heads=1,
        heads_present=1,
        key_ids=[name(shown=False)],  # shown cut to 16 characters
        findings=[_finding(name, rng, evidence_shown=False)],
    )
    diff = CheckpointDiff(name(), name(), 2, 8, name())
    diff.summary = diff_report(Names(rng), rng).summary()  # counts only
    diff.tensors = [TensorChange(name(), "changed", 3, 6, 0.5, 0.1, 0.99)]
    diff.changed_tensors = 4
    diff.findings = [_finding(name, rng, evidence_shown=False)]
    diff.modified = [name()]
    broken = CheckpointDiff(name(), name(), None, None, name(), error=name())
    return RunReport(
        run_id=name(),
        ledger=name(),
        generated=0.0,
        info=RunInfo(0.0, 9.0, 2, name(), 100, name(), 10, True, name()),
        timelines=[timeline],
        ranks_not_plotted=[],
        alerts=alerts,
        alerts_total=len(alerts),
        alert_rules={a.rule: 1 for a in alerts},
        markers=[Marker(a.step or 0, 0, "alert", name(), Severity.HIGH) for a in alerts]
        + [Marker(5, 1, "break", name(), Severity.CRITICAL)],
        verification=verification,
        environment=EnvironmentStatus("differs", name(), [name(), name()], name()),
        checkpoints=2,
        diffs=[diff, broken],
        notes=[name()],
    )


def scan_report(name: Names, rng: random.Random) -> ScanReport:
    files = [
        FileResult(name(), name(), 100, [_finding(name, rng, evidence_shown=True)], error=name())
        for _ in range(rng.randint(1, 3))
    ]
    return ScanReport(files=files)


def replay_report(name: Names, rng: random.Random) -> ReplayReport:
    fields = (
        FieldDiff("before", name(), name(), (name(), name())),
        FieldDiff("loss", 1.0, float("nan")),
        FieldDiff(name(), name(), name()),
    )
    divergence = Divergence(7, "step", fields, name(), (name(),))
    condition = ConditionDiff(name(), name(), name())
    segments = [
        Segment(0, 5, None, "matched", 5, 0.1, 0.2),
        Segment(
            5, 10, name(), "diverged", 5, 0.1, 0.2, divergence, [condition], [name()], [name()]
        ),
    ]
    return ReplayReport(name(), name(), 0, rng.choice(["keyed", "plain", name()]), 0, 10, True,
                        segments, [name()])  # fmt: skip


def verifier_summary(name: Names, rng: random.Random) -> Summary:
    run_id = name()
    status = name() if rng.random() < 0.3 else "diverged"
    verdicts = [
        Verdict(0, 10, "matched", seconds=0.5),
        Verdict(10, 20, status, 12, (1,), name(), (name(),), (name(),)),
    ]
    return Summary(run_id, 0.1, 0.05, 4, verdicts, [{"rule": name(), "message": name()}])


BUILDERS: dict[str, Callable[[Names, random.Random], object]] = {
    "diff": diff_report,
    "run": run_report,
}
EVERY_KIND: dict[str, Callable[[Names, random.Random], object]] = {
    **BUILDERS,
    "scan": scan_report,
    "replay": replay_report,
    "verifier": verifier_summary,
}


class Page(HTMLParser):
    """Every tag with its attributes, and the text between tags (references decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.texts: list[str] = []
        self._text: list[str] = []

    def _flush(self) -> None:
        self.texts.append("".join(self._text))
        self._text = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._flush()
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self._flush()

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_comment(self, data: str) -> None:
        raise AssertionError(f"a comment in the page: {data[:80]!r}")

    def unknown_decl(self, data: str) -> None:
        raise AssertionError(f"a declaration in the page: {data[:80]!r}")


def test_every_html_format_has_a_hostile_builder() -> None:
    """A new HTML output without a builder here would escape this test."""
    assert {kind for kind, fmt in _RENDERERS if fmt == "html"} == set(BUILDERS)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_hostile_names_come_out_as_text(kind: str) -> None:
    rng = random.Random(seed())
    for _ in range(12):
        name = Names(rng)
        page = render(BUILDERS[kind](name, rng), "html", tool_version="test")
        for raw in ("\x00", "\u202e", "\u2066", "\x1b", "\udc80"):
            assert raw not in page, f"{raw!r} reached the page unescaped"
        parsed = Page()
        parsed.feed(page)
        parsed.close()
        parsed._flush()
        for tag, attrs in parsed.tags:
            assert "TOK" not in tag, tag
            for attr, value in attrs:
                assert "TOK" not in attr and "TOK" not in (value or ""), (tag, attr, value)
                assert not attr.startswith("on") and attr != "style", (tag, attr)
                assert "javascript:" not in (value or "").lower(), (tag, attr, value)
        names = [t for t, _ in parsed.tags]
        assert set(names) <= TAGS, set(names) - TAGS
        assert names.count("style") == 1
        policy = ("http-equiv", "Content-Security-Policy")
        metas = [dict(a) for t, a in parsed.tags if t == "meta" and policy in a]
        assert [m["content"] for m in metas] == [csp(CSS)]
        text = "\x01".join(parsed.texts)
        for issued in name.issued:
            shown = printable(issued)
            assert shown in text, f"{shown[:120]!r} is not shown whole as text"


def _strings(value: object) -> list[str]:
    """Every string in a JSON document, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_every_kind_has_a_hostile_builder() -> None:
    assert {kind for kind, _ in _RENDERERS} == set(EVERY_KIND)


@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
def test_hostile_names_in_text_and_json(kind: str) -> None:
    """Text: nothing a terminal would act on (no control, bidi or escape character but the
    line ends).  JSON: ASCII, and the names read back exactly (the first is checked)."""
    rng = random.Random(seed())
    for _ in range(6):
        name = Names(rng)
        report = EVERY_KIND[kind](name, rng)
        assert kind_of(report) == kind
        text = render(report, "text", tool_version="test")
        odd = {ch for ch in text if not ch.isprintable() and ch != "\n"}
        assert not odd, f"{kind} text holds {sorted(odd)!r}"
        out = render(report, "json", tool_version="test")
        assert out.isascii()
        strings = set(_strings(json.loads(out)))
        first = name.issued[0]  # every builder's first name is a whole field
        assert first in strings, f"{kind} JSON does not read back {first[:80]!r}"
