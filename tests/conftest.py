"""Fixtures every test gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import own_state
from trainguard.ledger.anchorfile import ANCHORS_ENV


class _OwnStateMonkeyPatch(pytest.MonkeyPatch):  # type: ignore[misc]  # final for typing only
    """A test that patches trainguard.monitor's own globals on purpose (``budget.chances``
    to force draws) re-takes the self-check's import-time record of them
    (monitor/ownstate.py) after the patch and after its undo: otherwise the next watch()
    rightly names the patch as made before it started."""

    def setattr(self, *args: Any, **kwargs: Any) -> None:
        super().setattr(*args, **kwargs)
        _retake(args[0] if args else kwargs.get("target"))

    def delattr(self, *args: Any, **kwargs: Any) -> None:
        super().delattr(*args, **kwargs)
        _retake(args[0] if args else kwargs.get("target"))

    def undo(self) -> None:
        patched = any(_ours(obj) for obj, _, _ in self._setattr)
        super().undo()
        if patched:
            _retake("trainguard.monitor")


def _ours(target: Any) -> bool:
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    module = name if isinstance(target, str) else getattr(target, "__module__", None) or name
    return isinstance(module, str) and module.startswith("trainguard.monitor")


def _retake(target: Any) -> None:
    if _ours(target):
        own_state.retake()


@pytest.fixture
def monkeypatch() -> Iterator[pytest.MonkeyPatch]:
    patch = _OwnStateMonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(autouse=True)
def _anchors_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """watch() appends each run's anchor to the user's state dir: a test never writes the
    real home (subprocesses inherit the variable), and each test starts with no anchors."""
    monkeypatch.setenv(ANCHORS_ENV, str(tmp_path_factory.mktemp("anchors") / "anchors.jsonl"))
