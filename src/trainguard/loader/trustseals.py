"""Which seals cover a path, found from the path alone.

A seal covers a file when it lies in the seal's reach: ``FILE.sig`` beside it
(a single-file seal, which names the file), ``model.sig`` in its folder or
any folder above, or a signature the trust policy names for a folder or file
that holds it.  The path is taken both as given (made absolute) and with its
links resolved, so that a link can neither hide the seal of the folder it
sits in nor borrow the seal of the file it points to.

The order says which seal decides (the most specific: the deepest sealed
root, a file before its folder); :mod:`trainguard.loader.trust` holds every
covering seal to the loaded bytes and the deciding one to the policy's
expectations.  Nothing here reads a signature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SIGNATURE_NAME = "model.sig"


@dataclass(frozen=True)
class Covering:
    sig: Path  # the signature file
    root: Path  # the sealed folder, or the file itself for a single-file seal
    rel: str  # the loaded file relative to root ("." for a single-file seal)
    named: bool  # named by the policy rather than found beside the file

    @property
    def single(self) -> bool:
        return self.rel == "."

    @property
    def depth(self) -> int:
        # A file is deeper than its own folder: FILE.sig decides before model.sig.
        return len(self.root.parts) + (1 if self.single else 0)


def _views(source: str) -> list[Path]:
    """The path as given (absolute, links kept) and resolved, once each."""
    return list(dict.fromkeys([Path(os.path.abspath(source)), Path(os.path.realpath(source))]))


def covering_seals(source: str, named: tuple[tuple[Path, Path], ...]) -> list[Covering]:
    """Every seal that covers ``source``, the deciding (most specific) one first."""
    found: dict[tuple[str, str], Covering] = {}

    def add(sig: Path, root: Path, target: Path, by_policy: bool) -> None:
        rel = "." if root == target else target.relative_to(root).as_posix()
        found.setdefault((os.path.realpath(sig), rel), Covering(sig, root, rel, by_policy))

    for target in _views(source):
        single = target.with_name(target.name + ".sig")
        if os.path.lexists(single):
            add(single, target, target, False)
        for folder in target.parents:
            sig = folder / SIGNATURE_NAME
            if os.path.lexists(sig):
                add(sig, folder, target, False)
        for sealed, sig in named:
            for root in _views(os.fspath(sealed)):
                if root == target or root in target.parents:
                    add(sig, root, target, True)
    # Stable: among equally specific seals, those beside the file come first.
    return sorted(found.values(), key=lambda c: (-c.depth, c.named))


def pinned_roots(
    source: str, pins: tuple[tuple[Path, str], ...]
) -> list[tuple[Path, str, set[Path]]]:
    """Pins (sealed root, manifest digest) whose root holds ``source``, with the
    forms that root may take in :func:`covering_seals`."""
    targets = _views(source)
    out = []
    for sealed, digest in pins:
        roots = set(_views(os.fspath(sealed)))
        if any(r == t or r in t.parents for r in roots for t in targets):
            out.append((sealed, digest, roots))
    return out
