"""Every output of every report, behind one entry: ``render(report, fmt)``.

A report is data from the library (a scan's :class:`~trainguard.findings.ScanReport`,
a checkpoint diff, a replay, a run report, the verifier's summary); a format is one entry in
:data:`_RENDERERS`, keyed by (kind of report, format name).  Adding a format,
or a kind of report, is one entry and one function; nothing else changes.
Renderers return text and never print: the CLI decides where it goes.

Each renderer's module is imported when it is first used: a text scan report
need not load the SARIF code (hashlib, pathlib, urllib), nor a JSON one rich,
nor a scan the diff code (numpy).  The kind of a report is looked up by its
class's name for the same reason, without importing the explain/ packages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainguard.render.options import Options, Renderer

if TYPE_CHECKING:
    from trainguard.render.jsonfmt import render_json
    from trainguard.render.sarif import render_sarif
    from trainguard.render.text import render_text


# The report classes, by "module.QualifiedName" of the class or of a base class.
KINDS = {
    "trainguard.findings.ScanReport": "scan",
    "trainguard.explain.diff.result.DiffReport": "diff",
    "trainguard.explain.replay.result.ReplayReport": "replay",
    "trainguard.explain.report.build.RunReport": "run",
    "trainguard.explain.verifier.follow.Summary": "verifier",
}

# (kind, format) -> "module:function"; the function takes (report, Options).
_RENDERERS: dict[tuple[str, str], str] = {
    ("scan", "text"): "trainguard.render.text:draw",
    ("scan", "json"): "trainguard.render.jsonfmt:draw",
    ("scan", "sarif"): "trainguard.render.sarif:draw",
    ("diff", "text"): "trainguard.render.diff:draw_text",
    ("diff", "json"): "trainguard.render.diff:draw_json",
    ("diff", "html"): "trainguard.render.diff:draw_html",
    ("replay", "text"): "trainguard.render.replay:draw_text",
    ("replay", "json"): "trainguard.render.replay:draw_json",
    ("run", "text"): "trainguard.render.run_report:draw_text",
    ("run", "json"): "trainguard.render.run_report:draw_json",
    ("run", "html"): "trainguard.render.html_report:draw",
    ("verifier", "text"): "trainguard.render.verifier:draw_text",
    ("verifier", "json"): "trainguard.render.verifier:draw_json",
}


def formats(kind: str) -> tuple[str, ...]:
    """The format names a kind of report (a value of :data:`KINDS`) renders to."""
    return tuple(fmt for k, fmt in _RENDERERS if k == kind)


FORMATS = formats("scan")  # the scan report's, as before there were other kinds
_MODULES = {"render_json": "jsonfmt", "render_sarif": "sarif", "render_text": "text"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def installed_version() -> str:
    """trainguard's version: ``pyproject.toml`` reads it from ``trainguard.__version__``.

    Not looked up with ``importlib.metadata``, whose import alone costs a
    tenth of a one-file scan.
    """
    from trainguard import __version__

    return __version__


def kind_of(report: object) -> str:
    """``scan``, ``diff``, ``replay``, ``run`` or ``verifier``; ValueError for anything else."""
    for cls in type(report).__mro__:
        kind = KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    raise ValueError(f"not a trainguard report: {type(report).__qualname__}")


def renderer(kind: str, fmt: str) -> Renderer:
    """The function drawing ``kind`` reports as ``fmt``; ValueError naming the known formats."""
    try:
        target = _RENDERERS[(kind, fmt)]
    except KeyError:
        known = ", ".join(formats(kind)) or "none"
        raise ValueError(
            f"unknown {kind} report format {fmt!r} (expected one of: {known})"
        ) from None
    module, _, function = target.partition(":")
    drawn: Renderer = getattr(importlib.import_module(module), function)
    return drawn


def render(
    report: object,
    fmt: str,
    *,
    color: bool = False,
    tool_version: str | None = None,
    show_all: bool = False,
    root: str | None = None,
) -> str:
    """``report`` in format ``fmt`` (see :func:`formats`).

    ``color`` only affects text formats; ``tool_version`` defaults to the
    installed version.
    """
    draw = renderer(kind_of(report), fmt)
    version = installed_version() if tool_version is None else tool_version
    return draw(report, Options(version, color=color, show_all=show_all, root=root))


__all__ = [
    "FORMATS",
    "KINDS",
    "Options",
    "Renderer",
    "formats",
    "installed_version",
    "kind_of",
    "render",
    "render_json",
    "render_sarif",
    "render_text",
    "renderer",
]
