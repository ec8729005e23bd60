"""Files that no RECORD row judges: compiled files outside ``__pycache__``, and files
no distribution lists, with what would import them (see :mod:`.imports`)."""

from __future__ import annotations

import os
import sysconfig

from trainguard.env.checks import Ownership, shadowed_module
from trainguard.env.digests import DEFAULT_ALGORITHM, Digests
from trainguard.env.findings import finding, unlisted_finding
from trainguard.env.imports import (
    Importer,
    find_importers,
    host_folder,
    names_made_importable,
    owned_folders,
    plugin_importers,
    stdlib_sources,
)
from trainguard.env.native import link_finding, loader_format, native_finding
from trainguard.env.pathcode import Candidate, candidate_findings, installed_top_names, wanted_names
from trainguard.env.record import InstalledDist
from trainguard.env.sort import Scope, Sorted, legacy_source
from trainguard.env.walk import FILE, SPECIAL
from trainguard.findings import Finding


def loose_findings(
    scope: Scope,
    own: Ownership,
    dists: list[InstalledDist],
    sorted_: Sorted,
    present: dict[str, str],
    digests: dict[str, Digests],
    on_roots: list[Candidate] | None = None,
    own_names: dict[str, set[str]] | None = None,
) -> list[Finding]:
    """Files no RECORD row judges: legacy pycs and unlisted files; ``on_roots``: the
    modules no RECORD lists on the sys.path entries .pth files add (see env.pathcode),
    ``own_names`` the names an editable install provides from its own root."""
    out: list[Finding] = []
    for path in sorted_.legacy_pycs:
        if os.path.exists(legacy_source(path)):
            out.append(
                finding(
                    "TG612",
                    "compiled file beside its source; Python loads the source instead",
                    path,
                )
            )
        else:
            out.append(
                finding(
                    "TG611",
                    "compiled module without source that Python imports, and no RECORD "
                    "hash vouches for it",
                    path,
                )
            )
    roots = scope.roots
    shadowing: dict[str, str | None] = {}
    offered: dict[str, list[str]] = {}  # unlisted file -> module names importing runs it
    owned = owned_folders(own.rows, roots)
    for path in sorted_.unlisted:
        root = next((r for r in roots if path.startswith(r + os.sep)), "")
        later = roots[roots.index(root) + 1 :] if root in roots else []
        shadowing[path] = shadowed_module(path, own, root, later)
        if shadowing[path] is None and root and present[path] != SPECIAL:
            offered[path] = names_made_importable(path, root, owned)
    wanted = {name for names in offered.values() for name in names}
    wanted |= wanted_names(on_roots or [])
    importers: dict[str, Importer] = {}
    hosts: dict[str, str] = {}  # unlisted module -> the installed package folder holding it
    plugins: dict[str, Importer] = {}
    if wanted:
        stdlib = scope.stdlib or [sysconfig.get_paths()["stdlib"]]
        installed = _installed_sources(dists, roots)
        importers = find_importers(wanted, [*installed, *stdlib_sources(stdlib)])
        for path, names in offered.items():
            root = next(r for r in roots if path.startswith(r + os.sep))
            host = host_folder(path, root, owned) if names else None
            if host is not None:
                hosts[path] = host
        plugins = plugin_importers(set(hosts.values()), installed)
    for path in sorted_.unlisted:
        got = digests.get(path)
        imported = next(((n, importers[n]) for n in offered.get(path, ()) if n in importers), None)
        if imported is None and hosts.get(path) in plugins:
            imported = (offered[path][0], plugins[hosts[path]])
        size = got.size if got else 0
        root = next((r for r in roots if path.startswith(r + os.sep)), "")
        item = unlisted_finding(path, present[path], size, shadowing[path], imported)
        if item.rule == "TG603" and root:
            item = _native(path, root, present[path], owned, size) or item
        if got is not None:
            item.evidence["sha256"] = got.values[DEFAULT_ALGORITHM].hex()
        out.append(item)
    if on_roots:
        provided = installed_top_names(own.rows, roots)
        out.extend(candidate_findings(on_roots, provided, importers, own_names or {}))
    return out


def _native(path: str, root: str, kind: str, owned: set[str], size: int) -> Finding | None:
    """What is worse than an unlisted file: a linked package at an import root, or a
    file the dynamic loader runs inside an installed package (see env.native)."""
    if kind != FILE:
        return link_finding(path, root, kind)
    host = host_folder(path, root, owned)
    how = loader_format(path) if host is not None else None
    return native_finding(path, host, root, size, how) if host is not None and how else None


def _installed_sources(dists: list[InstalledDist], roots: list[str]) -> list[tuple[str, str]]:
    """Every installed distribution's own Python sources, with the site folder each is in."""
    out: list[tuple[str, str]] = []
    for dist in dists:
        for row in dist.entries:
            if row.path.endswith(".py"):
                root = next((r for r in roots if row.path.startswith(r + os.sep)), dist.root)
                out.append((row.path, root))
    return out
