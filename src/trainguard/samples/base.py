"""The `Sample` record and the registries the sample modules fill in."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Verdict = Literal["critical", "high", "medium", "low", "clean"]
Builder = Callable[[Path, Path], Path]


@dataclass(frozen=True)
class Sample:
    id: str  # stable slug, e.g. "pickle-p0-os-system"
    title: str  # one line
    technique: str  # what it demonstrates
    advisory: str  # URL of the advisory/write-up, or ""
    loader: str  # key in LOADERS: how a victim loads it
    fires: bool  # True if the payload provably runs under `loader`
    malicious: bool
    expect: str  # minimal scanner verdict: "critical" | "high" | "medium" | "low" | "clean"
    # Optional modules needed to BUILD it, or for its payload's globals to
    # resolve when loaded (numpy.testing, torch.utils...).  The loader's own
    # imports are in LOADER_REQUIRES.
    requires: tuple[str, ...]
    build: Builder  # build(out_dir, canary_path) -> path of the written file


MALICIOUS: dict[str, Sample] = {}
BENIGN: dict[str, Sample] = {}
_VERDICTS = ("critical", "high", "medium", "low", "clean")


def _register(table: dict[str, Sample], sample: Sample) -> None:
    if sample.id in MALICIOUS or sample.id in BENIGN:
        raise ValueError(f"duplicate sample id {sample.id!r}")
    if sample.expect not in _VERDICTS:
        raise ValueError(f"{sample.id}: bad expect {sample.expect!r}")
    table[sample.id] = sample


def malicious(
    id: str,
    title: str,
    technique: str,
    *,
    advisory: str = "",
    loader: str = "pickle",
    fires: bool = True,
    expect: Verdict = "critical",
    requires: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as a malicious sample."""

    def deco(build: Builder) -> Builder:
        _register(
            MALICIOUS,
            Sample(id, title, technique, advisory, loader, fires, True, expect, requires, build),
        )
        return build

    return deco


def benign(
    id: str,
    title: str,
    technique: str,
    *,
    loader: str = "pickle",
    expect: Verdict = "clean",
    requires: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as a benign sample (never fires)."""

    def deco(build: Builder) -> Builder:
        _register(
            BENIGN, Sample(id, title, technique, "", loader, False, False, expect, requires, build)
        )
        return build

    return deco


# -- payload text: each only creates the canary file -----------------------------


def py_touch(canary: Path) -> str:
    """Python source that creates the canary (for exec, eval-free contexts)."""
    return f"open({str(canary)!r}, 'w').close()"


def sh_touch(canary: Path) -> str:
    """A shell command that creates the canary."""
    return f"touch {shlex.quote(str(canary))}"


class Reduce:
    """An object that real picklers (torch.save, numpy, joblib) reduce to a call.

    Used where the container, not the opcodes, is what a sample demonstrates:
    the file is then written by the genuine library, byte for byte.
    """

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args
