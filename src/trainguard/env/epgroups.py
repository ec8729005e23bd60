"""Entry-point groups that installed code loads at run time, found by reading its source.

A fixed list of plug-in groups rots (``pytorch_lightning.callbacks_factory``:
``Trainer()`` imports and calls every entry point of it; ``lightning_fabric``'s,
``torchrun.handlers``, ``torch_dynamo_backends``, ``fsspec.specs``...).  So the groups
are found the way the import check finds module names: every group some distribution
declares in its ``entry_points.txt`` is looked for, as a quoted string literal, in the
other installed distributions' ``.py`` files (read as bytes, never imported).  A
group named in code is one that code loads: through ``entry_points(group=...)``,
``.select(group=...)``, ``entry_points()[...]`` or a helper given the name
(``_load_external_callbacks("pytorch_lightning.callbacks_factory")``).  Matching the
quoted name anywhere over-approximates, which is the safe side.

An entry point that one distribution declares in a group another distribution's code
loads is code that runs without being imported by name: TG625 unless an off-host
reference vouches for the declaring distribution.  High with a reference (which then
did not vouch); medium in a plain verify, which has nothing to tell an honest plug-in
(``huggingface_hub``'s ``hf://`` for ``fsspec.specs``) from a forged distribution
whose RECORD is right.  A distribution's entry points in a group only its own code
loads are its own wiring, verified with its RECORD.

Bounded: only the groups declared are looked for, each file is read once up to
:data:`trainguard.env.imports.MAX_READ_BYTES` (a larger or unreadable one counts as
naming every group: fail closed),
tests folders are skipped; what each file names is remembered in the digest cache under
its stat, so a verify with a warm cache reads only the sources that changed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable

from trainguard.digest_cache import DigestCache
from trainguard.env.findings import finding
from trainguard.env.imports import _read as read_source
from trainguard.env.launcher import entry_point_groups
from trainguard.env.record import InstalledDist
from trainguard.env.scripts import MAX_ENTRY_POINTS_BYTES, read_small
from trainguard.filestate import Identity
from trainguard.findings import Finding, Severity

# Launchers are judged by TG623; pytest loads pytest11 only when pytest runs (see
# env.vouch); the groups TG625 always reports are env.vouch's AUTOLOAD_GROUPS.
NOT_RUNTIME = frozenset({"console_scripts", "gui_scripts", "pytest11"})
_TESTS = frozenset({"tests", "test", "testing"})


def declared(
    dists: Iterable[InstalledDist], skip: Iterable[str]
) -> dict[str, list[tuple[InstalledDist, str, str]]]:
    """Group -> (distribution, name, target) of every entry point declared, but ``skip``."""
    left_out = NOT_RUNTIME | set(skip)
    out: dict[str, list[tuple[InstalledDist, str, str]]] = {}
    for dist in dists:
        data = read_small(os.path.join(dist.meta_dir, "entry_points.txt"), MAX_ENTRY_POINTS_BYTES)
        if isinstance(data, str):
            continue
        text = data[:MAX_ENTRY_POINTS_BYTES].decode("utf-8", "replace")
        for group, points in entry_point_groups(text).items():
            if group not in left_out:
                out.setdefault(group, []).extend((dist, n, t) for n, t in sorted(points.items()))
    return out


def loaders(
    groups: Iterable[str],
    dists: Iterable[InstalledDist],
    cache: DigestCache | None = None,
    identity: Callable[[str], Identity | None] | None = None,
) -> dict[str, dict[str, str]]:
    """Group -> meta_dir of each distribution whose code names it -> the file that does.

    With a cache, what each file names is remembered under its stat and the set of
    groups looked for (a new group looks at every file again once)."""
    needles = {g: (f'"{g}"'.encode(), f"'{g}'".encode()) for g in groups}
    out: dict[str, dict[str, str]] = {g: {} for g in needles}
    if not needles:
        return out
    label = "tg-epgroups-" + hashlib.sha256("\n".join(sorted(needles)).encode()).hexdigest()[:16]
    for dist in dists:
        for row in dist.entries:
            path = row.path
            if not path.endswith(".py") or _TESTS.intersection(path.split(os.sep)):
                continue
            key = identity(path) if cache is not None and identity is not None else None
            remembered = cache.get(path, key, label, 0) if cache is not None and key else None
            if cache is not None and remembered is not None:
                cache.hits -= 1  # not a digest: the summary counts those
                named = set(remembered[0].decode("utf-8", "replace").split("\n")) - {""}
            else:
                started = time.time_ns()
                data = read_source(path)
                if data is None:  # listed but gone: TG602 says so
                    continue
                # A file that cannot be read (too large, not a file) names every group.
                named = {
                    g
                    for g, (double, single) in needles.items()
                    if isinstance(data, str) or double in data or single in data
                }
                if cache is not None and key is not None and isinstance(data, bytes):
                    value = "\n".join(sorted(named)).encode()
                    cache.put(path, key, label, 0, [value], started)
            for group in named & needles.keys():
                out[group].setdefault(dist.meta_dir, path)
    return out


def plugin_findings(
    dists: list[InstalledDist],
    skip: Iterable[str],
    has_reference: bool,
    cache: DigestCache | None = None,
    identity: Callable[[str], Identity | None] | None = None,
) -> list[Finding]:
    """TG625 for each entry point declared in a group another distribution's code loads."""
    groups = declared(dists, skip)
    found = loaders(groups, dists, cache, identity)
    severity = Severity.HIGH if has_reference else Severity.MEDIUM
    out: list[Finding] = []
    for group, points in sorted(groups.items()):
        for dist, name, target in points:
            other = next(((m, f) for m, f in found[group].items() if m != dist.meta_dir), None)
            if other is None:
                continue
            out.append(
                finding(
                    "TG625",
                    f"{dist.label} declares the entry point {name} = {target} in [{group}], "
                    f"a group installed code loads ({other[1]} names it), so its code runs "
                    "without being imported by name"
                    + ("" if has_reference else "; only an off-host reference can vouch for it"),
                    dist.meta_dir,
                    severity=severity,
                    trigger=f"{group}: {name} = {target}"[:200],
                    group=group,
                    target=target[:200],
                    loaded_by=other[1],
                )
            )
    return out
