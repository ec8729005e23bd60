"""What a renderer is: a function of a report and :class:`Options`, returning text.

Apart from :mod:`trainguard.render` so that each renderer module can name the
type without importing the package that dispatches to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Options:
    """What a renderer may be asked besides the report; each format reads what applies."""

    tool_version: str
    color: bool = False  # ANSI styles (text formats)
    show_all: bool = False  # a diff's unchanged tensors in text too
    root: str | None = None  # SARIF: paths relative to this folder (default: cwd)


Renderer = Callable[[Any, Options], str]
