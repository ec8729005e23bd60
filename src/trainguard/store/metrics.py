"""The store guard's counters, and the small HTTP endpoint that serves them.

``/metrics`` speaks the Prometheus text format (no client library needed for
a handful of counters), ``/status`` the same numbers as JSON, ``/healthz``
says whether the loop has polled recently.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class StoreMetrics:
    scans: int = 0
    scan_seconds: float = 0.0
    rescans: int = 0  # files that changed while being scanned or moved
    polls: int = 0
    errors: int = 0  # files the guard could not judge or move this time (retried)
    pending: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    last_poll: float = 0.0  # wall clock
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def scanned(self, seconds: float) -> None:
        with self._lock:
            self.scans += 1
            self.scan_seconds += seconds

    def decided(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def failed(self) -> None:
        with self._lock:
            self.errors += 1

    def polled(self) -> None:
        with self._lock:
            self.polls += 1
            self.last_poll = time.time()

    def set_pending(self, n: int) -> None:
        with self._lock:
            self.pending = n

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "scans": self.scans,
                "scan_seconds": round(self.scan_seconds, 6),
                "rescans": self.rescans,
                "polls": self.polls,
                "errors": self.errors,
                "pending": self.pending,
                "outcomes": dict(self.outcomes),
                "last_poll": self.last_poll,
                "uptime_seconds": round(time.time() - self.started, 3),
            }

    def prometheus(self) -> str:
        s = self.snapshot()
        outcomes = s["outcomes"]
        assert isinstance(outcomes, dict)
        lines = [
            "# HELP trainguard_store_scans_total Files scanned.",
            "# TYPE trainguard_store_scans_total counter",
            f"trainguard_store_scans_total {s['scans']}",
            "# HELP trainguard_store_scan_seconds_total Time spent scanning.",
            "# TYPE trainguard_store_scan_seconds_total counter",
            f"trainguard_store_scan_seconds_total {s['scan_seconds']}",
            "# HELP trainguard_store_rescans_total Files that changed while scanned or moved.",
            "# TYPE trainguard_store_rescans_total counter",
            f"trainguard_store_rescans_total {s['rescans']}",
            "# HELP trainguard_store_errors_total Files the guard could not judge or move.",
            "# TYPE trainguard_store_errors_total counter",
            f"trainguard_store_errors_total {s['errors']}",
            "# HELP trainguard_store_verdicts_total Verdicts by outcome.",
            "# TYPE trainguard_store_verdicts_total counter",
        ]
        for outcome in ("clean", "quarantined"):
            lines.append(
                f'trainguard_store_verdicts_total{{outcome="{outcome}"}} {outcomes.get(outcome, 0)}'
            )
        lines += [
            "# HELP trainguard_store_pending Files waiting for their writer to finish.",
            "# TYPE trainguard_store_pending gauge",
            f"trainguard_store_pending {s['pending']}",
            "# HELP trainguard_store_last_poll_timestamp_seconds When the folder was last read.",
            "# TYPE trainguard_store_last_poll_timestamp_seconds gauge",
            f"trainguard_store_last_poll_timestamp_seconds {s['last_poll']}",
        ]
        return "\n".join(lines) + "\n"


def serve(metrics: StoreMetrics, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; ``shutdown()`` then ``server_close()`` stop it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, kind = metrics.prometheus(), "text/plain; version=0.0.4"
            elif self.path == "/status":
                body, kind = json.dumps(metrics.snapshot(), sort_keys=True), "application/json"
            elif self.path == "/healthz":
                body, kind = "ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return  # no access log on stderr: the guard's own output stays readable

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="trainguard-store-http", daemon=True).start()
    return server
