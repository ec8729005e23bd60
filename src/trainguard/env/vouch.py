"""Start-up code and autoloaded entry points that only the site folder vouches for.

RECORD, ``entry_points.txt``, ``top_level.txt`` and ``direct_url.json`` are written by
whoever writes the site folder: a row added to some RECORD for a planted
``sitecustomize`` or ``.pth`` import line, or a forged distribution whose RECORD is
right, vouches for nothing.  So code that runs without being asked is high unless an
off-host reference (``--wheelhouse``/``--lock``) compared its bytes with a wheel:

* a ``sitecustomize``/``usercustomize`` or a ``.pth`` import line that a RECORD lists
  unchanged (TG626), except ``.pth`` lines whose whole text is what an installer
  generates (setuptools' ``distutils-precedence.pth``, an editable install's finder
  hook; a ``-nspkg.pth`` is not recognised: allowlist it by sha256);
* a distribution that declares an entry point in a group a library loads when it is
  imported (TG625): ``torch.backends`` (``import torch`` imports and calls every one),
  ``pydantic`` (plugins, loaded when the first model is defined).  ``pytest11`` is left
  out on purpose: pytest loads it only when pytest runs, never in training;
* a distribution without RECORD outside an OS package folder (``dist-packages``) that
  claims modules (TG626): pip always writes RECORD.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from trainguard.env.findings import finding, is_code
from trainguard.env.launcher import entry_point_groups
from trainguard.env.pth import PthFile
from trainguard.env.record import InstalledDist
from trainguard.env.scripts import MAX_ENTRY_POINTS_BYTES, read_small
from trainguard.findings import Finding, Severity

AUTOLOAD_GROUPS = {
    "torch.backends": "import torch imports and calls every entry point of this group",
    "pydantic": "pydantic loads every plugin of this group when the first model is defined",
}
OS_PACKAGE_FOLDERS = frozenset({"dist-packages"})
# Whole .pth texts that installers generate (each line of the file must match one).
_GENERATED = (
    # setuptools' distutils-precedence.pth (the default was 'stdlib' before 60.0)
    re.compile(
        r"import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os\.environ\.get\(var, "
        r"'(?:local|stdlib)'\) == 'local'; enabled and __import__\('_distutils_hack'\)"
        r"\.add_shim\(\); ?"
    ),
)
_EDITABLE_HOOK = re.compile(r"import (__editable___[A-Za-z0-9_]+_finder); \1\.install\(\)")


def generated_hook(pth: PthFile, owner: InstalledDist | None) -> bool:
    """Whether every import line of ``pth`` is one an installer generates."""
    for line in pth.exec_lines:
        if any(p.fullmatch(line) for p in _GENERATED):
            continue
        if owner is not None and owner.editable and _EDITABLE_HOOK.fullmatch(line):
            continue
        return False
    return bool(pth.exec_lines)


def metadata_only(item: Finding, owner: InstalledDist | None) -> Finding:
    """The TG626 finding that replaces a start-up hook only a RECORD row vouches for."""
    who = owner.label if owner is not None else "a distribution"
    return finding(
        "TG626",
        f"{item.message}; only {who}'s RECORD vouches for it, and whoever can plant it "
        "can write that row (an off-host reference, --wheelhouse/--lock, can vouch)",
        item.file,
        trigger=item.trigger,
        evidence=dict(item.evidence),
    )


def autoload_findings(dists: Iterable[InstalledDist]) -> list[Finding]:
    """TG625 for each distribution declaring an entry point in an autoloaded group."""
    out: list[Finding] = []
    for dist in dists:
        data = read_small(os.path.join(dist.meta_dir, "entry_points.txt"), MAX_ENTRY_POINTS_BYTES)
        if isinstance(data, str):
            continue
        groups = entry_point_groups(data[:MAX_ENTRY_POINTS_BYTES].decode("utf-8", "replace"))
        for group, why in AUTOLOAD_GROUPS.items():
            for name, target in sorted(groups.get(group, {}).items()):
                out.append(
                    finding(
                        "TG625",
                        f"{dist.label} declares the entry point {name} = {target} in "
                        f"[{group}]: {why}, so its code runs in every process that imports it",
                        dist.meta_dir,
                        trigger=f"{group}: {name} = {target}"[:200],
                        group=group,
                        target=target[:200],
                    )
                )
    return out


def unrecorded_code(dists: Iterable[InstalledDist]) -> list[Finding]:
    """TG626 for a distribution without RECORD, outside an OS package folder, that
    claims modules: its claim is what keeps them from being reported as unlisted."""
    out: list[Finding] = []
    for dist in dists:
        if dist.has_record or os.path.basename(dist.root) in OS_PACKAGE_FOLDERS:
            continue
        inside = dist.meta_dir + os.sep
        code = [
            c
            for c in dist.claims
            if c != dist.meta_dir
            and not c.startswith(inside)
            and (os.path.isdir(c) or (is_code(c) and os.path.lexists(c)))
        ]
        if code:
            out.append(
                finding(
                    "TG626",
                    f"{dist.label} has no RECORD, outside an OS package folder, and claims "
                    f"{len(code)} module(s) ({os.path.basename(code[0])}): only its own "
                    "metadata says they are installed code",
                    dist.meta_dir,
                    severity=Severity.HIGH,
                    claims=", ".join(os.path.basename(c) for c in code[:10]),
                )
            )
    return out
