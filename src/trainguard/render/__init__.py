"""Report renderers: every format is drawn from the same :class:`ScanReport`.

A format is one entry in :data:`_RENDERERS`; adding one (HTML, say) touches
nothing else.  Renderers return text and never print: the CLI decides where it
goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from trainguard.findings import ScanReport
from trainguard.render.jsonfmt import render_json
from trainguard.render.sarif import render_sarif
from trainguard.render.text import render_text

FORMATS = ("text", "json", "sarif")


@dataclass(frozen=True)
class RenderOptions:
    color: bool
    tool_version: str


Renderer = Callable[[ScanReport, RenderOptions], str]

_RENDERERS: dict[str, Renderer] = {
    "text": lambda report, opts: render_text(report, color=opts.color),
    "json": lambda report, opts: render_json(report, tool_version=opts.tool_version),
    "sarif": lambda report, opts: render_sarif(report, tool_version=opts.tool_version),
}


def installed_version() -> str:
    try:
        return metadata.version("trainguard")
    except metadata.PackageNotFoundError:
        # Running from a source tree that was never installed.
        return "0+unknown"


def render(
    report: ScanReport, fmt: str, *, color: bool = False, tool_version: str | None = None
) -> str:
    """``report`` in format ``fmt`` (one of :data:`FORMATS`).

    ``color`` only affects the text format.  ``tool_version`` defaults to the
    installed distribution's version.
    """
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown report format {fmt!r} (expected one of: {', '.join(FORMATS)})"
        ) from None
    version = installed_version() if tool_version is None else tool_version
    return renderer(report, RenderOptions(color=color, tool_version=version))


__all__ = ["FORMATS", "render", "render_json", "render_sarif", "render_text"]
