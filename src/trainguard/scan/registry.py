"""The format table: the one place a new file format is registered.

Order matters only for sniffing: strong magic numbers first, then formats
recognised by parsing a little (protocol 0/1 pickles), then the weakest
signatures (lzma-alone, zlib), so a weak match never shadows a strong one.
"""

from __future__ import annotations

from trainguard.scan.base import Format
from trainguard.scan.formats.compressed import BZIP2, GZIP, LZ4, LZMA_ALONE, XZ, ZLIB
from trainguard.scan.formats.gguf import GgufFormat
from trainguard.scan.formats.hdf5 import Hdf5Format
from trainguard.scan.formats.jsonconfig import TokenizerConfigFormat
from trainguard.scan.formats.keras import KerasZipFlavour
from trainguard.scan.formats.numpy_npy import NpyFormat
from trainguard.scan.formats.onnx import OnnxFormat
from trainguard.scan.formats.pickles import PickleFormat
from trainguard.scan.formats.safetensors import SafetensorsFormat
from trainguard.scan.formats.savedmodel import KerasMetadataFormat, SavedModelFormat
from trainguard.scan.formats.sevenzip import SevenZipFormat
from trainguard.scan.formats.tars import TarFormat
from trainguard.scan.formats.templates import ChatTemplateFormat
from trainguard.scan.formats.zips import ZipFlavour, ZipFormat

# Zips recognised by their member names (checked before every member is scanned).
ZIP_FLAVOURS: tuple[ZipFlavour, ...] = (KerasZipFlavour(),)

FORMATS: tuple[Format, ...] = (
    ZipFormat(flavours=ZIP_FLAVOURS),
    SevenZipFormat(),
    GZIP,
    BZIP2,
    XZ,
    LZ4,
    NpyFormat(),
    GgufFormat(),
    Hdf5Format(),
    TarFormat(),
    # No magic, but a shape no pickle has: a plausible length and "{" at byte 8.
    SafetensorsFormat(),
    # Text that starts with "{": a JSON object naming a chat template, or a Jinja tag.
    TokenizerConfigFormat(),
    ChatTemplateFormat(),
    PickleFormat(),
    # Protobuf has no magic: recognised by parsing the first fields against a schema.
    SavedModelFormat(),
    KerasMetadataFormat(),
    OnnxFormat(),
    LZMA_ALONE,
    ZLIB,
    ZipFormat(prefixed=True, flavours=ZIP_FLAVOURS),
)


def sniff(head: bytes, blob: object) -> Format | None:
    for fmt in FORMATS:
        if fmt.sniff(head, blob):  # type: ignore[arg-type]
            return fmt
    return None
