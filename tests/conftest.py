"""Fixtures every test gets."""

from __future__ import annotations

import pytest

from trainguard.ledger.anchorfile import ANCHORS_ENV


@pytest.fixture(autouse=True)
def _anchors_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """watch() appends each run's anchor to the user's state dir: a test never writes the
    real home (subprocesses inherit the variable), and each test starts with no anchors."""
    monkeypatch.setenv(ANCHORS_ENV, str(tmp_path_factory.mktemp("anchors") / "anchors.jsonl"))
