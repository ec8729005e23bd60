"""The format table: the one place a new file format is registered.

Order matters only for sniffing: strong magic numbers first, then formats
recognised by parsing a little (protocol 0/1 pickles), then the weakest
signatures (lzma-alone, zlib), so a weak match never shadows a strong one.
"""

from __future__ import annotations

from trainguard.scan.base import Format
from trainguard.scan.formats.compressed import BZIP2, GZIP, LZ4, LZMA_ALONE, XZ, ZLIB
from trainguard.scan.formats.numpy_npy import NpyFormat
from trainguard.scan.formats.pickles import PickleFormat
from trainguard.scan.formats.sevenzip import SevenZipFormat
from trainguard.scan.formats.tars import TarFormat
from trainguard.scan.formats.zips import ZipFormat

FORMATS: tuple[Format, ...] = (
    ZipFormat(),
    SevenZipFormat(),
    GZIP,
    BZIP2,
    XZ,
    LZ4,
    NpyFormat(),
    TarFormat(),
    PickleFormat(),
    LZMA_ALONE,
    ZLIB,
    ZipFormat(prefixed=True),
)


def sniff(head: bytes, blob: object) -> Format | None:
    for fmt in FORMATS:
        if fmt.sniff(head, blob):  # type: ignore[arg-type]
            return fmt
    return None
