"""The PostgreSQL ledger rides out a server outage: appends are buffered in order and
written when the server is back, with a ``ledger-outage`` record; the chain verifies.
Never silent: closing while the server stays away raises with the count not written.

The outage is a TCP proxy between the ledger and the test server that drops every
connection and refuses new ones (what a client sees of a restart);
bench/postgres_ledger.py restarts the real server under 8-32 writers.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import closing
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.test_ledger_support import postgres_schema, unsigned_only
from trainguard.ledger import LedgerError, verify_ledger
from trainguard.ledger import outage as outage_mod
from trainguard.ledger.postgres_store import PostgresLedger


class Proxy:
    """Forwards 127.0.0.1:port to the server until cut(); resume() listens again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.resume()

    def resume(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self.listener is not None
        # shutdown wakes the thread blocked in accept(); close alone leaves it listening.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.listener = None
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture()
def urls(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, Proxy]]:
    monkeypatch.setattr(outage_mod, "RETRY_SECONDS", 0.0)
    monkeypatch.setattr(outage_mod, "CLOSE_WAIT_SECONDS", 0.5)
    with postgres_schema() as url:
        parts = urlsplit(url)
        proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        yield url, urlunsplit(parts._replace(netloc=netloc)), proxy
        if proxy.listener is not None:
            proxy.cut()


def test_records_written_during_an_outage_arrive_in_order(
    urls: tuple[str, str, Proxy],
) -> None:
    direct, proxied, proxy = urls
    ledger = PostgresLedger(proxied + "&connect_timeout=2")
    with closing(ledger):
        for i in range(3):
            ledger.append("r", "step", {"i": i}, step=i, stream=0)
        proxy.cut()
        for i in range(3, 7):
            pending = ledger.append("r", "step", {"i": i}, step=i, stream=0)
            assert pending.seq == -1  # queued, not lost, not raised
        proxy.resume()
        ledger.append("r", "step", {"i": 7}, step=7, stream=0)
    with closing(PostgresLedger(direct)) as reader:
        records = list(reader.records("r"))
        assert [r.kind for r in records] == ["step"] * 7 + ["ledger-outage", "step"]
        assert [r.payload.get("i") for r in records if r.kind == "step"] == list(range(8))
        assert records[7].payload["written_late"] == 4
        assert unsigned_only(verify_ledger(reader, "r"))


def test_closing_while_the_server_stays_away_says_what_is_missing(
    urls: tuple[str, str, Proxy],
) -> None:
    _, proxied, proxy = urls
    ledger = PostgresLedger(proxied + "&connect_timeout=2")
    ledger.append("r", "step", {"i": 0}, step=0, stream=0)
    proxy.cut()
    ledger.append("r", "step", {"i": 1}, step=1, stream=0)
    with pytest.raises(LedgerError, match="1 records could not be written"):
        ledger.close()
