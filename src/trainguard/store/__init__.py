"""Guard the places models enter: a service over a shared checkpoint folder.

``StoreGuard`` scans each new or changed file once its writer is done, moves
failing ones to a quarantine folder and records every verdict (SQLite, or
PostgreSQL when shared); ``trainguard store watch`` runs it.
"""

from trainguard.store.service import StoreGuard, StoreOptions
from trainguard.store.verdicts import Verdict, open_verdicts

__all__ = ["StoreGuard", "StoreOptions", "Verdict", "open_verdicts"]
