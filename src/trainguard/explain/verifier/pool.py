"""The verifier's data-parallel replay processes, kept alive from one segment to the next.

:func:`~trainguard.explain.replay.ranks.replay_ranks` starts a gloo group of
fresh processes for each replay: right for ``trainguard replay --all-ranks``
(one replay), but a verifier recomputing segment after segment would pay
torch's import, the entry's import and the group's set-up every time.  A
:class:`RankPool` starts one :mod:`.rank_server` per rank on first use and
sends each segment to all of them; the group lives as long as the verifier.

Fail closed: a rank that errs, dies or does not answer within the timeout ends
the pool (every process is killed) and the segment is an error; the next
segment starts a fresh pool.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

from trainguard.explain.replay.ledger import ReplayError
from trainguard.explain.replay.result import ReplayReport, report_from_dict

DEFAULT_TIMEOUT_S = 600.0  # one segment's replay on every rank
MAX_ANSWER = 64 << 20  # bytes: a report names differing tensors, never holds them


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RankPool:
    """``world_size`` rank servers replaying ``run_id`` through ``entry`` (module:function)."""

    def __init__(
        self,
        ledger: str,
        run_id: str,
        entry: str,
        world_size: int,
        key: bytes | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if world_size < 1:
            raise ReplayError(f"world size {world_size}: nothing to replay")
        self.timeout = timeout
        self._logs = tempfile.TemporaryDirectory(prefix="trainguard-verify-ranks-")
        self.procs: list[subprocess.Popen[bytes]] = []
        header = {"ledger": ledger, "run_id": run_id, "entry": entry,
                  "world_size": world_size, "port": _port(),
                  "key": key.hex() if key else None}  # fmt: skip
        try:
            for rank in range(world_size):
                with open(self._log(rank), "wb") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "trainguard.explain.verifier.rank_server"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                    )
                self.procs.append(proc)
                # On stdin, not the command line: not for `ps` to show the key.
                self._send(proc, dict(header, rank=rank))
        except OSError as exc:
            self.close(kill=True)
            raise ReplayError(f"cannot start the replay ranks: {exc}") from None
        except ReplayError:
            self.close(kill=True)
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _log(self, rank: int) -> str:
        return os.path.join(self._logs.name, f"rank{rank}.err")

    def _send(self, proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            raise ReplayError(f"a replay rank is gone ({exc})") from None

    def replay(self, options: dict[str, Any]) -> list[ReplayReport]:
        """Every rank's report of one replay (:func:`~trainguard.explain.replay.engine.replay`'s
        ``options``, without ``key``); ReplayError, and the pool closed, if any rank fails."""
        try:
            for proc in self.procs:
                self._send(proc, {"options": options})
            answers = self._answers()
        except ReplayError:
            self.close(kill=True)
            raise
        reports, errors = [], []
        for rank, answer in enumerate(answers):
            if answer.get("error"):
                errors.append(f"rank {rank}: {answer['error']}")
            else:
                reports.append(report_from_dict(answer["report"]))
        if errors:
            self.close(kill=True)  # a rank that erred left the others in a collective
            raise ReplayError("replaying the ranks failed: " + "; ".join(errors))
        return reports

    def _answers(self) -> list[dict[str, Any]]:
        """One JSON line from every rank, within the timeout."""
        buffers = [b""] * len(self.procs)
        done: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            for rank, proc in enumerate(self.procs):
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ, rank)
            while len(done) < len(self.procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplayError(self._failure("did not answer within "
                                                    f"{self.timeout:.0f} s", done))  # fmt: skip
                for ready, _ in sel.select(timeout=left):
                    rank = ready.data
                    stream: IO[bytes] = ready.fileobj  # type: ignore[assignment]
                    chunk = os.read(stream.fileno(), 1 << 16)
                    if not chunk:
                        sel.unregister(stream)
                        raise ReplayError(self._failure(f"rank {rank} exited", done))
                    buffers[rank] += chunk
                    if len(buffers[rank]) > MAX_ANSWER:
                        raise ReplayError(f"rank {rank} answered more than {MAX_ANSWER} bytes")
                    if b"\n" in buffers[rank]:
                        line, _, buffers[rank] = buffers[rank].partition(b"\n")
                        done[rank] = json.loads(line)
                        sel.unregister(stream)
        return [done[r] for r in range(len(self.procs))]

    def _failure(self, what: str, done: dict[int, Any]) -> str:
        tails = []
        for rank in range(len(self.procs)):
            if rank in done:
                continue
            try:
                with open(self._log(rank), "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - 300))
                    tails.append(f"rank {rank}: {fh.read().decode('utf-8', 'replace').strip()}")
            except OSError:
                pass
        return f"replaying the ranks failed: {what}" + (f" ({'; '.join(tails)})" if tails else "")

    def close(self, *, kill: bool = False) -> None:
        """End every rank server (EOF on stdin; killed if it does not leave, or at once)."""
        for proc in self.procs:
            if kill:
                proc.kill()
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []
        self._logs.cleanup()
