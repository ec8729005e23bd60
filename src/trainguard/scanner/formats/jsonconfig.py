"""Chat templates inside JSON: ``tokenizer_config.json``, ``chat_template.json``.

Only files that carry a ``chat_template`` are claimed (or that look like a
tokenizer config by their ``added_tokens_decoder``); other JSON files, such as
a model's ``config.json``, are left to the formats that understand them.  Every
``chat_template`` value at any depth is analysed, duplicates included, since
JSON readers disagree about which duplicate wins.
"""

from __future__ import annotations

import encodings.utf_8_sig  # noqa: F401  (codecs load lazily; a scan never imports)
import json
from collections.abc import Iterator
from typing import Any

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.templates import template_findings

_KEY = "chat_template"
_MARKERS = (b'"chat_template"', b'"added_tokens_decoder"')
_SNIFF_SCAN = 4 * 1024 * 1024  # how far to look for "chat_template" past the head
_MAX_TEMPLATES = 64


class _Collect:
    """``object_pairs_hook`` that remembers every ``chat_template`` value it meets."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        for key, value in pairs:
            if key == _KEY and len(self.values) < _MAX_TEMPLATES:
                self.values.append(value)
        return dict(pairs)


class TokenizerConfigFormat:
    name = "tokenizer-config"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if not head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            return False
        if any(m in head for m in _MARKERS):
            return True
        if blob.size is not None and blob.size <= len(head):
            return False
        with blob.open() as f:  # a long added_tokens list can push the key past the head
            return _MARKERS[0] in f.read(_SNIFF_SCAN)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        cap = ctx.limits.max_tokenizer_config
        with blob.open() as f:
            raw = f.read(cap + 1)
        if len(raw) > cap:
            yield _finding(
                "TG002",
                f"JSON file longer than the limit of {cap:,} bytes; its "
                "chat templates were not analysed",
            )
            return
        found = _Collect()
        try:
            json.loads(raw.decode("utf-8-sig"), object_pairs_hook=found)
        except (UnicodeDecodeError, RecursionError, ValueError) as exc:
            yield _finding(
                "TG003",
                f"not valid JSON ({type(exc).__name__}: {exc}); its chat "
                "templates could not be analysed",
            )
            return
        for i, value in enumerate(found.values):
            suffix = f"[{i}]" if len(found.values) > 1 else ""
            for label, template in _templates(value, f"{_KEY}{suffix}"):
                yield from template_findings(template, ctx.limits, label)


def _templates(value: object, label: str) -> Iterator[tuple[str, str]]:
    """A template string, or transformers' list of ``{"name": ..., "template": ...}``."""
    if isinstance(value, str):
        yield label, value
    elif isinstance(value, list):
        for item in value[:_MAX_TEMPLATES]:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                yield f"{label}[{item.get('name', '?')}]", item["template"]


def _finding(rule_id: str, message: str) -> Finding:
    return finding(rule_id, message)
