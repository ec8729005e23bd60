"""One rank of the verifier's data-parallel pool: ``python -m
trainguard.explain.verifier.rank_server``.

Unlike :mod:`trainguard.explain.replay.rank_worker` (one replay, then exit), this
process lives as long as the verifier: it imports torch and the entry point and
joins the gloo group once, then replays one segment per job line on stdin and
answers one JSON line per job (:mod:`.pool`).  It reads its rank's stream
incrementally, as the verifier does, so a job's cost does not grow with the run.
Whatever the entry prints goes to stderr, so that the answers' channel carries
nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.explain.replay.engine import load_entry, replay
from trainguard.explain.replay.ranks import join_group
from trainguard.explain.replay.result import report_to_dict
from trainguard.explain.verifier.reading import RunReader
from trainguard.ledger import open_ledger

MAX_LINE = 1 << 20  # a job line is a few hundred bytes


def main() -> None:
    import torch.distributed as dist

    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the entry's prints must not reach the answers
    header: dict[str, Any] = json.loads(sys.stdin.readline(MAX_LINE))
    join_group(header["port"], header["rank"], header["world_size"])
    key = bytes.fromhex(header["key"]) if header["key"] else None
    entry: Any = None
    try:
        entry = load_entry(header["entry"])  # imported once for every segment
    except TrainguardError as exc:
        entry_error = str(exc)  # each job is answered with it
    # The rank's stream, read incrementally and chain-checked (:mod:`.reading`): a job
    # neither re-reads nor re-verifies the run (the verifier verifies it whole at its end).
    store = open_ledger(header["ledger"], create=False)
    reader = RunReader(store, header["run_id"], [header["rank"]])
    for line in iter(lambda: sys.stdin.readline(MAX_LINE), ""):
        job = json.loads(line)
        result: dict[str, Any]
        try:
            if entry is None:
                raise TrainguardError(entry_error)
            for _ in reader.new_records():  # only what this rank wrote since the last job
                pass
            report = replay(
                store, header["run_id"], entry, rank=header["rank"], key=key,
                verified_history=reader.history(header["rank"]), **job["options"],
            )  # fmt: skip
            result = {"report": report_to_dict(report)}
            dist.barrier()  # the next job starts together
        except TrainguardError as exc:
            result = {"error": str(exc)}
        answers.write(json.dumps(result) + "\n")
        answers.flush()
    store.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
