"""The one HTML page every report is drawn on: one stylesheet, one policy, one escaper.

Names in these pages (tensor paths, run ids, file names, alert messages) were
chosen by whoever wrote the checkpoint or the ledger, so there is exactly one
way for text to enter markup, :func:`esc`, and one page frame, :func:`page`,
whose Content-Security-Policy forbids everything but its own stylesheet
(``default-src 'none'``, the stylesheet allowed by its SHA-256).  Markup that
slipped through escaping could then still load and run nothing: no script, no
inline ``style`` attribute, no image, no form, no base URL.

The pages carry no script at all and work offline: charts are inline SVG
(:mod:`.html_svg`), whose presentation attributes are not styles.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable

from trainguard.findings import Finding, Severity
from trainguard.render.text import printable

CSS = """
:root{color-scheme:light}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1a1a1a;
background:#fafafa}
header,main,footer,nav{max-width:960px;margin:0 auto;padding:0 20px}
header{padding-top:20px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;
border-bottom:1px solid #ccc}h3{font-size:1em;margin:1em 0 .3em}
code{font:.87em ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.verdict{font-weight:bold;padding:8px 12px;border-left:6px solid}
.verdict.fail{border-color:#c00018;background:#fde8ea}
.verdict.ok{border-color:#1b7a3a;background:#e6f4ea}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:.8em 0}
dl.facts dt{font-weight:600}dl.facts dd{margin:0}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 18px}
a{color:#0b57a4}
figure{margin:0 0 1.2em;break-inside:avoid;page-break-inside:avoid}
figcaption{font-weight:600;margin-bottom:2px}
svg.chart{width:100%;height:auto;display:block;font-family:inherit;background:#fff}
svg.chart text{fill:#333}
svg.bar{vertical-align:middle;margin-right:4px}
ul.legend{list-style:none;padding:0;margin:4px 0 0;display:flex;flex-wrap:wrap;gap:2px 16px;
font-size:.87em}
ul.legend svg{vertical-align:middle;margin-right:4px}
table{border-collapse:collapse;width:100%;margin:.4em 0 1em;font-size:.93em}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.sev{font-weight:bold;white-space:nowrap}
.sev-critical{color:#fff;background:#a00014;-webkit-print-color-adjust:exact;
print-color-adjust:exact}.sev-high{color:#a00014}
.sev-medium{color:#8a4b00}.sev-low{color:#00587a}.sev-info{color:#555}
.ev{margin:.2em 0 0;padding-left:1.2em;font-size:.93em;color:#333}
.status-ok{color:#1b7a3a;font-weight:bold}.status-bad{color:#a00014;font-weight:bold}
.status-none{color:#555;font-weight:bold}
.st-changed{color:#8a4b00}.st-added{color:#1b7a3a}.st-removed{color:#a00014}
.st-retyped,.st-reshaped{color:#6a1b9a}
.note{color:#555}
footer{color:#555;font-size:.87em;padding-bottom:30px}
@media print{nav{display:none}body{background:#fff;font-size:12px}
.verdict.fail,.verdict.ok{background:none}a{color:inherit}
header,main,footer{max-width:none}}
"""

_SEVERITIES = {str(s) for s in Severity}


def esc(text: object) -> str:
    """Text safe anywhere in HTML or SVG markup, attribute values included.

    Non-printable characters (NUL, ANSI escapes, bidi overrides that would make
    one name read as another) become visible Python escapes first.
    """
    return html.escape(printable(str(text)), quote=True)


def csp(css: str = CSS) -> str:
    """The pages' policy: nothing but their own stylesheet (allowed by hash)."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def page(title: str, body: Iterable[str]) -> str:
    """A whole document: ``title`` is text (escaped here); ``body`` is markup built with
    :func:`esc`."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp()}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        *body,
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def severity_badge(severity: str) -> str:
    """A severity as written text (readable without colour), coloured when it is a known one."""
    cls = f"sev sev-{severity}" if severity in _SEVERITIES else "sev"
    return f'<span class="{cls}">{esc(severity)}</span>'


def fact_list(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; each value is markup already built with :func:`esc`."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def findings_table(
    findings: Iterable[Finding], caption: str, *, evidence: bool = False, offset: str = "offset"
) -> str:
    """Findings, highest severity first: severity, rule (with its title), where, what.

    ``offset`` names what a finding's offset counts (a ledger's findings hold a record's seq).
    """
    from trainguard.rules import RULES

    rows = []
    for f in sorted(findings, key=lambda f: -f.severity):
        where = f.member + ("" if f.offset is None else f", {offset} {f.offset}")
        title = RULES[f.rule].title if f.rule in RULES else ""
        ev = ""
        if evidence and f.evidence:
            items = "".join(
                f"<li><strong>{esc(k)}</strong>: <code>{esc(v)}</code></li>"
                for k, v in sorted(f.evidence.items())
            )
            ev = f'<ul class="ev">{items}</ul>'
        rows.append(
            f"<tr><td>{severity_badge(str(Severity(f.severity)))}</td><td><code>{esc(f.rule)}"
            f"</code><br>{esc(title)}</td><td><code>{esc(where)}</code></td>"
            f"<td>{esc(f.message)}{ev}</td></tr>"
        )
    return (
        f"<table><caption>{esc(caption)}</caption><thead><tr><th scope='col'>Severity</th>"
        "<th scope='col'>Rule</th><th scope='col'>Where</th><th scope='col'>What</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
