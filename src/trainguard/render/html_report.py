"""The run report as one self-contained HTML page that works offline.

No script, no external font, stylesheet or image: the charts are inline SVG
(:mod:`.html_svg`) and the one stylesheet is inline, allowed by its hash in a
Content-Security-Policy that forbids everything else (``default-src 'none'``),
so even markup that slipped through escaping could load and run nothing.
Every string from the ledger goes through :func:`~.html_svg.esc`.

Readable without colour (severity is written, lines differ by dash pattern,
marks by shape), navigable by headings and landmarks, and printable (the
navigation is dropped and charts are not split across pages).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from trainguard.findings import Finding, Severity
from trainguard.render.html_svg import Line, Mark, esc, line_chart, mark_swatch, swatch

if TYPE_CHECKING:
    from trainguard.explain.report.build import RunReport
    from trainguard.explain.report.diffs import CheckpointDiff

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
.note{color:#555}
footer{color:#555;font-size:.87em;padding-bottom:30px}
@media print{nav{display:none}body{background:#fff;font-size:12px}
.verdict.fail,.verdict.ok{background:none}a{color:inherit}
header,main,footer{max-width:none}}
"""

_SEVERITIES = {str(s) for s in Severity}


def csp(css: str = CSS) -> str:
    """The page's policy: nothing but its own stylesheet (allowed by hash)."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def _sev(severity: str) -> str:
    cls = f"sev sev-{severity}" if severity in _SEVERITIES else "sev"
    return f'<span class="{cls}">{esc(severity)}</span>'


def _facts(items: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def _header(report: RunReport) -> list[str]:
    from trainguard.render.run_report import run_summary, utc, verdict

    info = report.info
    facts = [
        ("Ledger", f"<code>{esc(report.ledger)}</code>"),
        ("Run", esc(run_summary(report))),
        ("Started", esc(utc(info.start_time))),
        ("Last record", esc(utc(info.end_time))),
    ]
    if info.error:
        facts.append(("Ended with", f"<code>{esc(info.error)}</code>"))
    state = "fail" if report.failed else "ok"
    return [
        "<header>",
        f"<h1>Training run report: <code>{esc(report.run_id)}</code></h1>",
        f'<p class="verdict {state}" role="status">{esc(verdict(report))}</p>',
        _facts(facts),
        "</header>",
        '<nav aria-label="Sections"><ul><li><a href="#timeline">Timeline</a></li>'
        '<li><a href="#alerts">Alerts</a></li><li><a href="#ledger">Ledger verification</a>'
        '</li><li><a href="#environment">Environment and signatures</a></li>'
        '<li><a href="#checkpoints">Checkpoint diffs</a></li></ul></nav>',
    ]


def _timeline(report: RunReport) -> list[str]:
    from trainguard.explain.report.build import METRICS
    from trainguard.render.run_report import METRIC_NAMES, num

    out = [
        '<section id="timeline" aria-labelledby="timeline-h">',
        '<h2 id="timeline-h">Timeline</h2>',
    ]
    span = report.steps
    if span is None:
        out += ['<p class="note">No step records: nothing to plot.</p>', "</section>"]
        return out
    marks = [Mark(m.step, m.kind, f"rank {m.rank}: {m.label}") for m in report.markers]
    alert_steps = sorted({m.step for m in report.markers if m.kind == "alert"})
    dropped_total = 0
    for metric in METRICS:
        name = METRIC_NAMES[metric]
        lines = [
            Line(f"rank {t.rank}", t.metrics[metric].points(), i)
            for i, t in enumerate(report.timelines)
            if t.metrics[metric].count
        ]
        nonfinite = sum(t.metrics[metric].nonfinite for t in report.timelines)
        if not lines and not nonfinite:
            continue
        lows = [s.lowest for t in report.timelines if (s := t.metrics[metric]).lowest is not None]
        highs = [
            s.highest for t in report.timelines if (s := t.metrics[metric]).highest is not None
        ]
        shown = ", ".join(str(s) for s in alert_steps[:10]) + (
            " ..." if len(alert_steps) > 10 else ""
        )
        description = (
            f"{name} of {len(lines)} rank(s) over steps {span[0]} to {span[1]}; "
            f"lowest {num(min(lows, default=None))}, highest {num(max(highs, default=None))}; "
            + (f"alerts at steps {shown}" if alert_steps else "no alerts")
        )
        svg, dropped = line_chart(f"c-{metric}", name, lines, marks, span, description)
        dropped_total = max(dropped_total, dropped)
        bad = (
            f' <span class="status-bad">({nonfinite} value(s) not finite, first at step '
            f"{esc(_first_nonfinite(report, metric))})</span>"
            if nonfinite
            else ""
        )
        out += [f"<figure><figcaption>{esc(name)}{bad}</figcaption>", svg, "</figure>"]
    legend = [f"<li>{swatch(i)}rank {t.rank}</li>" for i, t in enumerate(report.timelines)]
    legend.append(f"<li>{mark_swatch('alert')}alert (triangle)</li>")
    if any(m.kind == "break" for m in report.markers):
        legend.append(
            f"<li>{mark_swatch('break')}ledger record that fails verification (diamond)</li>"
        )
    out.append(f'<ul class="legend" aria-label="Legend">{"".join(legend)}</ul>')
    if dropped_total:
        out.append(f'<p class="note">{dropped_total} marked steps are not drawn.</p>')
    out.append("</section>")
    return out


def _first_nonfinite(report: RunReport, metric: str) -> str:
    steps = [s for t in report.timelines for s in t.metrics[metric].nonfinite_steps[:1]]
    return str(min(steps)) if steps else "?"


def _alerts(report: RunReport) -> list[str]:
    from trainguard.explain.report.build import group_alerts
    from trainguard.render.run_report import alert_summary, first_alert_line

    out = [
        '<section id="alerts" aria-labelledby="alerts-h">',
        f'<h2 id="alerts-h">Alerts ({report.alerts_total})</h2>',
    ]
    if not report.alerts:
        out += ["<p>The monitor raised no alert in this run.</p>", "</section>"]
        return out
    out.append(f"<p>{esc(alert_summary(report))}.</p>")
    start = first_alert_line(report)
    if start:
        out.append(f'<p class="start"><strong>{esc(start)}</strong>.</p>')
    out.append(
        "<table><caption>Each alert with the evidence the monitor recorded (the same alert "
        "at consecutive steps is shown once, with its steps)</caption>"
        '<thead><tr><th scope="col">Step</th><th scope="col">Rank</th>'
        '<th scope="col">Severity</th><th scope="col">Rule</th><th scope="col">What happened'
        "</th></tr></thead><tbody>"
    )
    for g in group_alerts(report.alerts):
        a = g.first
        evidence = "".join(
            f"<li><strong>{esc(k)}</strong>: <code>{esc(v)}</code></li>" for k, v in a.evidence
        )
        ev = f'<ul class="ev">{evidence}</ul>' if evidence else ""
        tampered = (
            '<br><span class="status-bad">This record fails ledger verification.</span>'
            if not a.intact
            else ""
        )
        repeated = f"<br>({g.count} alerts, one per step)" if g.count > 1 else ""
        out.append(
            f'<tr><td class="n">{esc(g.steps)}{repeated}</td><td class="n">{a.rank}</td>'
            f"<td>{_sev(a.severity)}</td><td><code>{esc(a.rule)}</code><br>{esc(a.title)}</td>"
            f"<td>{esc(a.message)}{ev}{tampered}</td></tr>"
        )
    out += ["</tbody></table>", "</section>"]
    return out


def _findings_table(findings: list[Finding], caption: str) -> str:
    from trainguard.rules import RULES

    rows = []
    for f in sorted(findings, key=lambda f: -f.severity):
        where = f.member + ("" if f.offset is None else f", seq {f.offset}")
        title = RULES[f.rule].title if f.rule in RULES else ""
        rows.append(
            f"<tr><td>{_sev(str(Severity(f.severity)))}</td><td><code>{esc(f.rule)}</code><br>"
            f"{esc(title)}</td><td>{esc(where)}</td><td>{esc(f.message)}</td></tr>"
        )
    return (
        f"<table><caption>{esc(caption)}</caption><thead><tr><th scope='col'>Severity</th>"
        "<th scope='col'>Rule</th><th scope='col'>Where</th><th scope='col'>What</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _ledger(report: RunReport) -> list[str]:
    from trainguard.render.run_report import ledger_summary, plural

    v = report.verification
    cls = "status-ok" if v.intact else "status-bad"
    out = [
        '<section id="ledger" aria-labelledby="ledger-h">',
        '<h2 id="ledger-h">Ledger verification</h2>',
        f'<p class="{cls}">{esc(ledger_summary(report))}</p>',
        "<p>Every record was re-hashed and every link and signed head checked "
        f"({plural(v.records, 'record')} in {plural(v.streams, 'stream')}).",
    ]
    if not v.intact:
        out.append(
            " Records that fail are marked on the timeline; what they say cannot be trusted."
        )
    out.append("</p>")
    if v.findings:
        out.append(_findings_table(v.findings, "Verification findings"))
    out.append("</section>")
    return out


def _environment(report: RunReport) -> list[str]:
    from trainguard.render.run_report import plural

    env, v = report.environment, report.verification
    state_cls = {"matches": "status-ok", "differs": "status-bad"}.get(env.state, "status-none")
    files = "".join(f"<li><code>{esc(f)}</code></li>" for f in env.files)
    if v.signatures_checked:
        sig_cls = "status-ok" if v.signed_heads and v.intact else "status-bad"
        sig = f"{plural(v.signed_heads, 'signed head')} verified with the given key"
    elif v.heads_present:
        sig_cls = "status-none"
        sig = f"{plural(v.heads_present, 'signed head')} present; not checked (pass --key)"
    else:
        sig_cls, sig = "status-none", "the run has no signed heads (watch(..., sign_key=...))"
    keys = ", ".join(k[:16] for k in v.key_ids)
    facts = [
        ("Environment", f'<span class="{state_cls}">{esc(env.state)}</span> {esc(env.detail)}'),
        ("Snapshot", f"<code>{esc(env.snapshot)}</code>" if env.snapshot else "none"),
        ("Ledger signatures", f'<span class="{sig_cls}">{esc(sig)}</span>'),
    ]
    if keys:
        facts.append(("Head key ids", f"<code>{esc(keys)}</code>"))
    out = [
        '<section id="environment" aria-labelledby="env-h">',
        '<h2 id="env-h">Environment and signatures</h2>',
        _facts(facts),
    ]
    if files:
        out.append(f"<h3>Files that differ from the snapshot</h3><ul>{files}</ul>")
    out.append("</section>")
    return out


def _diff(d: CheckpointDiff) -> list[str]:
    from trainguard.render.run_report import MODIFIED, num

    steps = f" (steps {d.a_step} to {d.b_step})" if d.a_step is not None else ""
    out = [
        f"<h3>{esc(d.reason)}{esc(steps)}</h3>",
        f"<p><code>{esc(d.a)}</code> &rarr; <code>{esc(d.b)}</code></p>",
    ]
    for path in d.modified:
        out.append(f'<p class="status-bad">Modified: <code>{esc(path)}</code> {esc(MODIFIED)}</p>')
    if d.error:
        out.append(f'<p class="status-bad">{esc(d.error)}</p>')
    else:
        out.append(f"<p>{esc(d.summary)}</p>")
    if d.tensors:
        rows = "".join(
            f"<tr><td><code>{esc(t.path or '(root)')}</code></td><td>{esc(t.status)}</td>"
            f'<td class="n">{t.changed:,} of {t.numel:,}</td><td class="n">'
            f'{esc(num(t.max_abs, ".3g"))}</td><td class="n">{esc(num(t.relative, ".3g"))}</td>'
            f'<td class="n">{esc(num(t.cosine, ".5f"))}</td></tr>'
            for t in d.tensors
        )
        more = d.changed_tensors - len(d.tensors)
        caption = "Most changed tensors" + (f" ({more} more not listed)" if more > 0 else "")
        out.append(
            f"<table><caption>{esc(caption)}</caption><thead><tr><th scope='col'>Tensor</th>"
            "<th scope='col'>Status</th><th scope='col'>Elements changed</th>"
            "<th scope='col'>Max |d|</th><th scope='col'>Relative</th>"
            f"<th scope='col'>Cosine</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    if d.findings:
        out.append(_findings_table(d.findings, "What an honest optimizer step could not do"))
    return out


def _checkpoints(report: RunReport) -> list[str]:
    out = [
        '<section id="checkpoints" aria-labelledby="ckpt-h">',
        '<h2 id="ckpt-h">Checkpoint diffs</h2>',
    ]
    if not report.diffs:
        out.append(
            f"<p>No checkpoint diff: {report.checkpoints} checkpoint record(s) in the ledger. "
            "Name two files with <code>--diff A B</code>, or give "
            "<code>--checkpoint-dir</code> where the recorded checkpoints are.</p>"
        )
    for d in report.diffs:
        out += _diff(d)
    out.append("</section>")
    return out


def render_html(report: RunReport, *, tool_version: str) -> str:
    from trainguard.render.run_report import utc

    notes = "".join(f'<li class="note">{esc(n)}</li>' for n in report.notes)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp()}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>trainguard report: {esc(report.run_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        *_header(report),
        "<main>",
        *_timeline(report),
        *_alerts(report),
        *_ledger(report),
        *_environment(report),
        *_checkpoints(report),
        f'<section aria-label="Notes"><ul>{notes}</ul></section>' if notes else "",
        "</main>",
        f"<footer><p>Generated by trainguard {esc(tool_version)} on {esc(utc(report.generated))} "
        "from the run's ledger. Everything shown was written by the monitored process; trust "
        "it as far as the ledger verification above allows.</p></footer>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
