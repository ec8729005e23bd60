"""Jinja filters that walk an attribute path named by an argument (map, sort, selectattr...).

jinja2's ``make_attrgetter`` follows each dotted part of ``attribute=`` with the
environment's getitem; a plain Environment (llama-cpp-python before 0.2.72) does
not guard it, so the name decides what the template reaches.
"""

from __future__ import annotations

import pytest

from trainguard import Severity
from trainguard.limits import DEFAULT_LIMITS
from trainguard.scanner.formats.templates import analyse_template


def _worst(source: str) -> Severity | None:
    hits = analyse_template(source, DEFAULT_LIMITS)
    return max((h.severity for h in hits), default=None)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages|map(attribute='__class__.__mro__')|list }}",
        "{{ messages|selectattr('__class__')|list }}",
        "{{ messages|rejectattr('__init__.__globals__')|list }}",
        "{% set k = '__cla' ~ 'ss__' %}{{ messages|sort(attribute=k)|list }}",
        "{{ messages|groupby('__class__')|list }}",
        "{{ messages|sum(attribute='__class__') }}",
    ],
)
def test_internal_attribute_paths_are_critical(source: str) -> None:
    assert _worst(source) is Severity.CRITICAL


def test_a_computed_attribute_path_fails_the_default() -> None:
    source = "{{ messages|sort(attribute=messages[0]['content'])|list }}"
    worst = _worst(source)
    assert worst is not None and worst >= Severity.HIGH


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages|map(attribute='content')|join(' ') }}",
        "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}",
        "{% for m in messages|sort(attribute='role') %}{{ m.content }}{% endfor %}",
        "{{ messages|map(attribute=0)|list }}",
    ],
)
def test_plain_attribute_paths_are_quiet(source: str) -> None:
    assert _worst(source) is None
