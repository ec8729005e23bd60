"""The format table: the one place a new file format is registered.

Order matters only for sniffing: strong magic numbers first, then formats
recognised by parsing a little (protocol 0/1 pickles), then the weakest
signatures (lzma-alone, zlib), so a weak match never shadows a strong one.

Each entry names its module and builds its format from it on first use: a
scan imports only the formats it has to ask (a torch checkpoint stops at the
first entry), which keeps a one-file scan's start-up small.  Module names are
fixed here; nothing a scanned file says can choose what is imported.  Call
:func:`preload` to import them all up front (an audit-hook test, a sandbox
that refuses imports).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, BinaryIO

from trainguard.findings import Finding
from trainguard.scanner.base import Blob, Format, ScanContext

_PACKAGE = "trainguard.scanner.formats."


class _Lazy:
    """Imports ``trainguard.scanner.formats.<module>`` and builds the object once, when first asked.

    ``prefilter``, when given, is a necessary condition the format's own check
    implies (its magic number, say), tested without importing the module: data
    that fails it cannot be this format, so most entries are never imported when
    a scan meets only a few formats (the tensor storages of a checkpoint).
    """

    def __init__(
        self, module: str, build: Callable[[ModuleType], Any], prefilter: Any = None
    ) -> None:
        self._module = module
        self._build = build
        self._prefilter = prefilter
        self._target: Any = None

    def target(self) -> Any:
        if self._target is None:
            self._target = self._build(importlib.import_module(_PACKAGE + self._module))
        return self._target

    @property
    def name(self) -> str:
        name: str = self.target().name
        return name


class LazyFormat(_Lazy):
    def sniff(self, head: bytes, blob: Blob) -> bool:
        if self._prefilter is not None and not self._prefilter(head):
            return False
        return bool(self.target().sniff(head, blob))

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        findings: Iterator[Finding] = self.target().scan(ctx, blob)
        return findings


class LazyFlavour(_Lazy):
    def matches(self, names: frozenset[str]) -> bool:
        if self._prefilter is not None and not self._prefilter(names):
            return False
        return bool(self.target().matches(names))

    def scan(self, ctx: ScanContext, blob: Blob, f: BinaryIO, directory: Any) -> Iterator[Finding]:
        findings: Iterator[Finding] = self.target().scan(ctx, blob, f, directory)
        return findings


_BOM = b"\xef\xbb\xbf"


def _text_opens_with_brace(head: bytes) -> bool:
    """JSON objects and Jinja tags ({%, {{, {#) start, after a BOM and blanks, with "{"."""
    return head.removeprefix(_BOM).lstrip()[:1] == b"{"


def _hdf5_signature(head: bytes) -> bool:
    return any(head[o : o + 4] == b"\x89HDF" for o in (0, 512, 1024, 2048))


# Zips recognised by their member names (checked before every member is scanned).
ZIP_FLAVOURS = (
    LazyFlavour("keras", lambda m: m.KerasZipFlavour(), lambda names: "config.json" in names),
    LazyFlavour(
        "torchscript",
        lambda m: m.TorchScriptFlavour(),
        lambda names: any(n.endswith("constants.pkl") for n in names),
    ),
    LazyFlavour(
        "torchpackage",
        lambda m: m.TorchPackageFlavour(),
        lambda names: any(n.endswith(".data/extern_modules") for n in names),
    ),
)

# Every blob, whatever claims it, is also asked what a pickle loader would do with it.
PICKLES = LazyFormat("pickles", lambda m: m.PickleFormat())

FORMATS: tuple[LazyFormat, ...] = (
    LazyFormat("zips", lambda m: m.ZipFormat(flavours=ZIP_FLAVOURS)),
    LazyFormat("sevenzip", lambda m: m.SevenZipFormat(), lambda h: h[:4] == b"7z\xbc\xaf"),
    LazyFormat("compressed", lambda m: m.GZIP),
    LazyFormat("compressed", lambda m: m.BZIP2),
    LazyFormat("compressed", lambda m: m.XZ),
    LazyFormat("compressed", lambda m: m.LZ4),
    LazyFormat("compressed", lambda m: m.JOBLIB_ZFILE, lambda h: h[:2] == b"ZF"),
    LazyFormat("numpy_npy", lambda m: m.NpyFormat(), lambda h: h[:6] == b"\x93NUMPY"),
    LazyFormat("gguf", lambda m: m.GgufFormat(), lambda h: h[:4] == b"GGUF"),
    LazyFormat("hdf5", lambda m: m.Hdf5Format(), _hdf5_signature),
    LazyFormat("tars", lambda m: m.TarFormat(), lambda h: h[257:262] == b"ustar"),
    # No magic, but a shape no pickle has: a plausible length and "{" at byte 8.
    LazyFormat("safetensors", lambda m: m.SafetensorsFormat(), lambda h: h[8:9] == b"{"),
    # Text that starts with "{": a JSON object naming a chat template, or a Jinja tag.
    LazyFormat("jsonconfig", lambda m: m.TokenizerConfigFormat(), _text_opens_with_brace),
    LazyFormat("templates", lambda m: m.ChatTemplateFormat(), _text_opens_with_brace),
    PICKLES,
    # Protobuf has no magic: recognised by parsing the first fields against a schema.
    LazyFormat("savedmodel", lambda m: m.SavedModelFormat()),
    LazyFormat("savedmodel", lambda m: m.KerasMetadataFormat()),
    LazyFormat("onnx", lambda m: m.OnnxFormat()),
    LazyFormat("compressed", lambda m: m.LZMA_ALONE),
    LazyFormat("compressed", lambda m: m.ZLIB),
    LazyFormat("zips", lambda m: m.ZipFormat(prefixed=True, flavours=ZIP_FLAVOURS)),
)


def sniff(head: bytes, blob: Blob) -> Format | None:
    for fmt in FORMATS:
        if fmt.sniff(head, blob):
            return fmt.target()  # type: ignore[no-any-return]
    return None


# Modules the formats import only when they meet a file of theirs.
_ON_USE = (
    "tarfile",
    "tempfile",
    "importlib.util",
    "trainguard.scanner.isolated",
    _PACKAGE + "codelike",
    _PACKAGE + "template_rules",
)


def preload() -> None:
    """Import every format and every module they would import on first use."""
    from trainguard.scanner.formats import templates

    for entry in (*FORMATS, *ZIP_FLAVOURS):
        entry.target()
    for module in _ON_USE:
        importlib.import_module(module)
    templates.parser()
