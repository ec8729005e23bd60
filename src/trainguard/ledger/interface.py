"""The interface every ledger store implements (SQLite, PostgreSQL, or a user's own).

Apart from :mod:`trainguard.ledger` itself so that the code that reads a
ledger (verification, reports, replay) can name the type without importing the
package that opens stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from trainguard.ledger.chain import Record


@runtime_checkable
class Ledger(Protocol):
    def append(
        self,
        run_id: str,
        kind: str,
        payload: dict[str, Any],
        *,
        step: int | None = None,
        stream: int = -1,
    ) -> Record:
        """Append one record to the (run_id, stream) chain, atomically."""

    def records(self, run_id: str, stream: int | None = None) -> Iterator[Record]:
        """The run's records (one stream's, if given), ordered by (stream, seq)."""

    def runs(self) -> list[str]:
        """Every run id in the ledger, sorted."""

    def sign_head(self, run_id: str, stream: int, private_key: Any) -> Record:
        """Append a ``kind="head"`` record signing the stream's current last record."""

    def close(self) -> None: ...
