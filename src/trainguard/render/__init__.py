"""Report renderers: every format is drawn from the same :class:`ScanReport`.

A format is one entry in :data:`_RENDERERS`; adding one (HTML, say) touches
nothing else.  Renderers return text and never print: the CLI decides where it
goes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trainguard.findings import ScanReport

if TYPE_CHECKING:
    from trainguard.render.jsonfmt import render_json
    from trainguard.render.sarif import render_sarif
    from trainguard.render.text import render_text

FORMATS = ("text", "json", "sarif")


def _text(report: ScanReport, *, color: bool, tool_version: str) -> str:
    from trainguard.render.text import render_text

    return render_text(report, color=color)


def _json(report: ScanReport, *, color: bool, tool_version: str) -> str:
    from trainguard.render.jsonfmt import render_json

    return render_json(report, tool_version=tool_version)


def _sarif(report: ScanReport, *, color: bool, tool_version: str) -> str:
    from trainguard.render.sarif import render_sarif

    return render_sarif(report, tool_version=tool_version)


# Each renderer imports its module when used: a text report need not load the
# SARIF code (hashlib, pathlib, urllib) nor a JSON one rich.
_RENDERERS: dict[str, Callable[..., str]] = {"text": _text, "json": _json, "sarif": _sarif}
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
    return renderer(report, color=color, tool_version=version)


__all__ = ["FORMATS", "render", "render_json", "render_sarif", "render_text"]
