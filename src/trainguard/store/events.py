"""Local change events wake the store guard early (optional: the ``watchdog`` library).

Events only shorten the wait between polls: a shared filesystem delivers no
events for other hosts' writes, so the poll is what guarantees coverage.
"""

from __future__ import annotations

import threading
from typing import Any


def start_events(root: str, wake: threading.Event) -> Any | None:
    """An observer that sets ``wake`` on any change under ``root``; None without watchdog."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            wake.set()

    observer = Observer()
    observer.schedule(Wake(), root, recursive=True)
    observer.daemon = True
    observer.start()
    return observer
