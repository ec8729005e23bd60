"""The run report as one HTML page of :mod:`.html_page` that works offline.

No script, no external font, stylesheet or image: the charts are inline SVG
(:mod:`.html_svg`) and the page frame, its stylesheet and its
Content-Security-Policy are :mod:`.html_page`'s, shared with every HTML report.
Every string from the ledger goes through :func:`~.html_page.esc`.

Readable without colour (severity is written, lines differ by dash pattern,
marks by shape), navigable by headings and landmarks, and printable (the
navigation is dropped and charts are not split across pages).
"""

from __future__ import annotations

from trainguard.explain.report.build import METRICS, RunReport, group_alerts
from trainguard.explain.report.diffs import CheckpointDiff
from trainguard.render.diff import summary_line
from trainguard.render.html_page import esc, fact_list, findings_table, page, severity_badge
from trainguard.render.html_svg import Line, Mark, line_chart, mark_swatch, swatch
from trainguard.render.options import Options
from trainguard.render.run_words import (
    METRIC_NAMES,
    MODIFIED,
    alert_summary,
    first_alert_line,
    group_steps,
    ledger_summary,
    num,
    plural,
    run_summary,
    utc,
    verdict,
)


def _header(report: RunReport) -> list[str]:
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
        fact_list(facts),
        "</header>",
        '<nav aria-label="Sections"><ul><li><a href="#timeline">Timeline</a></li>'
        '<li><a href="#alerts">Alerts</a></li><li><a href="#ledger">Ledger verification</a>'
        '</li><li><a href="#environment">Environment and signatures</a></li>'
        '<li><a href="#checkpoints">Checkpoint diffs</a></li></ul></nav>',
    ]


def _timeline(report: RunReport) -> list[str]:
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
            f'<tr><td class="n">{esc(group_steps(g))}{repeated}</td><td class="n">{a.rank}</td>'
            f"<td>{severity_badge(a.severity)}</td><td><code>{esc(a.rule)}</code><br>{esc(a.title)}</td>"
            f"<td>{esc(a.message)}{ev}{tampered}</td></tr>"
        )
    out += ["</tbody></table>", "</section>"]
    return out


def _ledger(report: RunReport) -> list[str]:
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
        out.append(findings_table(v.findings, "Verification findings", offset="seq"))
    out.append("</section>")
    return out


def _environment(report: RunReport) -> list[str]:
    env, v = report.environment, report.verification
    state_cls = {"matches": "status-ok", "differs": "status-bad"}.get(env.state, "status-none")
    files = "".join(f"<li><code>{esc(f)}</code></li>" for f in env.files)
    if v.signatures_checked:
        sig_cls = "status-ok" if v.signed_heads and v.intact else "status-bad"
        how = (
            "with the given key"
            if v.key_source == "given"
            else "with the run keys its run-start records name (pin them: ledger verify "
            "--expect-key-id)"
        )
        sig = f"{plural(v.signed_heads, 'signed head')} verified {how}"
    elif v.heads_present:
        sig_cls = "status-none"
        sig = f"{plural(v.heads_present, 'signed head')} present; not checked (pass --key)"
    else:
        sig_cls = "status-none"
        sig = "the run has no signed heads (watched with sign_key=False, or before signing)"
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
        fact_list(facts),
    ]
    if files:
        out.append(f"<h3>Files that differ from the snapshot</h3><ul>{files}</ul>")
    out.append("</section>")
    return out


def _diff(d: CheckpointDiff) -> list[str]:
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
        out.append(f"<p>{esc(summary_line(d.summary)) if d.summary else ''}</p>")
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
        out.append(findings_table(d.findings, "What an honest optimizer step could not do"))
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
    notes = "".join(f'<li class="note">{esc(n)}</li>' for n in report.notes)
    body = [
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
    ]
    return page(f"trainguard report: {report.run_id}", body)


def draw(report: RunReport, options: Options) -> str:
    return render_html(report, tool_version=options.tool_version)
