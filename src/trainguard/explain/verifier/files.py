"""Checkpoint files beside the run's recorded ones that no ledger record names.

Every regular file in the checkpoint folders is judged whatever its name: a
file whose extension a recorded checkpoint has, or whose first bytes are what
``torch.save`` writes (a zip or a pickle), is read through the allowlist loader;
a checkpoint of this run that no record names is an alert (TG1511), and so is
a file under a recorded checkpoint's extension that the loader refuses.  No
name is skipped (a ``.tmp-`` name is judged once it stops changing).

Following a run, a file is judged once it is unchanged (size and mtime) since
the previous poll: the guard writes the file, then its record right after.
A one-pass check (``final``) judges what it sees.  A file that changes again
after it was judged is judged again.  Hashing is bounded: a file is hashed only
when unchanged since the previous poll (one that keeps changing costs a stat
per poll until the final pass), and at most :data:`HASH_BYTES_PER_POLL` bytes
are hashed per poll (the rest waits for the next; the final pass reads all).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

MAX_FILES_PER_FOLDER = 10_000  # a checkpoint folder listed at each poll, bounded
HASH_BYTES_PER_POLL = 8 << 30  # a poll's hashing of new or changed files, bounded
_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

Alert = Callable[[str, str, "int | None", dict[str, Any]], None]


class Folders:
    """Watches the folders of the recorded checkpoints (and ``extra``) for run ``run_id``."""

    def __init__(self, run_id: str, extra: str | None, alert: Alert) -> None:
        self.run_id = run_id
        self.extra = extra
        self.alert = alert
        self._seen: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) at the last poll
        self._digests: dict[str, tuple[int, int, str]] = {}  # path -> size, mtime, BLAKE3
        self._judged: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) when judged

    def scan(self, records: list[Any], *, final: bool = False) -> None:
        from trainguard.monitor import checkpoint as ckpt

        recorded = {r.blake3 for r in records}
        folders = {os.path.dirname(r.path) for r in records if r.path}
        if self.extra:
            folders.add(self.extra)
        kinds = {os.path.splitext(r.name)[1] for r in records if r.name}
        budget = HASH_BYTES_PER_POLL
        for folder in sorted(folders):
            try:
                names = sorted(os.listdir(folder))[:MAX_FILES_PER_FOLDER]
            except OSError:
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not os.path.isfile(path):
                    continue
                now = (st.st_size, st.st_mtime_ns)
                before, self._seen[path] = self._seen.get(path), now
                if self._judged.get(path) == now:
                    continue
                if not final and before != now:
                    continue  # new or changing: judged once it holds still
                cached = self._digests.get(path)
                if cached is None or cached[:2] != now:
                    if not final and st.st_size > budget:
                        continue  # the next poll's budget
                    if os.path.splitext(name)[1] not in kinds and not _looks_saved(path):
                        self._judged[path] = now
                        continue
                    budget -= st.st_size
                    cached = (*now, ckpt.file_digest(path)[0])
                    self._digests[path] = cached
                if cached[2] in recorded:
                    continue  # a recorded checkpoint (or a copy of one)
                self._judged[path] = now
                self._judge(path, cached[2], os.path.splitext(name)[1] in kinds)

    def _judge(self, path: str, digest: str, checkpoint_kind: bool) -> None:
        from trainguard.errors import UnsafeModelError
        from trainguard.monitor import checkpoint as ckpt

        try:
            saved = ckpt.read(path)
        except UnsafeModelError as exc:
            if not checkpoint_kind:
                return  # a pickle under another extension (a user's .pkl): not a checkpoint
            message = f"{path}: beside the run's checkpoints, unrecorded, and refused: {exc}"
            self.alert("TG1511", message, None, {"file": path, "blake3": digest})
            return
        except Exception:  # not a checkpoint this loader reads: not this run's
            return
        if saved.run_id != self.run_id:
            return
        self.alert(
            "TG1511",
            f"{path}: a checkpoint of this run at step {saved.step} that no ledger record names",
            saved.step,
            {"file": path, "blake3": digest, "rank": saved.rank},
        )


def _looks_saved(path: str) -> bool:
    """Whether the file starts as ``torch.save`` output does (zip or pickle)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return any(head.startswith(m) for m in _MAGIC)
