"""Tar archives, including PyTorch's legacy tar checkpoint layout.

Members are read through :mod:`tarfile`'s header parser only (never
``extract``); each regular member is handed back to the engine, which sniffs
it by content.  Links and paths that escape the archive are findings.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from trainguard.errors import ScanError
from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats import torch_legacy_tar

if TYPE_CHECKING:
    import tarfile


def _escapes(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _link_escapes(info: tarfile.TarInfo) -> bool:
    """Where the link lands: a symlink relative to its own folder, a hard link to the root."""
    target = info.linkname.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return True
    base = posixpath.dirname(info.name.replace("\\", "/")) if info.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    return resolved == ".." or resolved.startswith("../") or _escapes(info.name)


class TarFormat:
    name = "tar"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return len(head) >= 262 and head[257:262] == b"ustar"

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            # A tar inside a compressed stream cannot seek: read it as a stream
            # and hand members over as bounded in-memory copies.
            streaming = not f.seekable()
            try:
                import tarfile  # only when a tar is met: most scans never see one

                tar = tarfile.open(fileobj=f, mode="r|" if streaming else "r:")
            except (tarfile.TarError, OSError, ValueError) as exc:
                yield finding("TG003", f"unreadable tar: {exc}")
                return
            count = 0
            try:
                for info in tar:
                    count += 1
                    if count > ctx.limits.max_archive_members:
                        yield finding(
                            "TG209",
                            f"more than {ctx.limits.max_archive_members} members",
                        )
                        return
                    yield from self._member(ctx, blob, tar, info, streaming)
            except (tarfile.TarError, OSError, ValueError) as exc:
                yield finding(
                    "TG003",
                    f"tar archive breaks after {count} members: {exc}",
                )

    def _member(
        self,
        ctx: ScanContext,
        blob: Blob,
        tar: tarfile.TarFile,
        info: tarfile.TarInfo,
        streaming: bool,
    ) -> Iterator[Finding]:
        member = f"{blob.name}/{info.name}" if blob.name else info.name
        if _escapes(info.name):
            yield finding(
                "TG207",
                f"member path {info.name!r} escapes the extraction folder",
                member=member,
                trigger=info.name,
            )
        if info.issym() or info.islnk():
            if _link_escapes(info):
                yield finding(
                    "TG207",
                    f"link {info.name!r} points outside the archive to {info.linkname!r}",
                    member=member,
                    trigger=info.linkname,
                )
            return
        if not info.isfile():
            return

        def opener(info: tarfile.TarInfo = info) -> BinaryIO:
            extracted = tar.extractfile(info)  # a bounded view of the member's bytes
            if extracted is None:
                raise ScanError(f"tar member {info.name!r} has no data")
            return extracted  # type: ignore[return-value]

        # torch.load reads these as pickles interleaved with raw data.
        walk = info.name in torch_legacy_tar.MEMBERS
        if streaming:
            if info.size > ctx.limits.max_in_memory_member:
                yield finding(
                    "TG002",
                    f"member of {info.size} bytes inside a compressed tar exceeds "
                    f"the in-memory limit of {ctx.limits.max_in_memory_member}",
                    member=member,
                )
                return
            with opener() as m:
                data = m.read()
            child = blob.child(info.name, lambda: io.BytesIO(data), len(data))
        else:
            child = blob.child(info.name, opener, info.size)
        if walk:
            yield from _located(torch_legacy_tar.scan_member(ctx, child, info.name), child.name)
        else:
            yield from ctx.scan_child(child)


def _located(found: Iterator[Finding], member: str) -> Iterator[Finding]:
    for f in found:
        yield f if f.member else f.located(f.file, member)
